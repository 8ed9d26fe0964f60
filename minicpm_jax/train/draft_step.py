"""A draft run's step (`draft.target` set): the EAGLE head's train and eval steps on a frozen target, in the shape of
`StepSetup`, so the training loop, its checkpoints, metrics, eval and resume are the model run's own.

    fr_ids = draft_vocabulary(exp, prepared, cfg)                      # FR-Spec ids, counted from the run's data
    setup = build_draft_step(exp, cfg, mesh, shape, target_params, fr_ids)
    state = setup.init_state(setup.init_params(seed))                  # the draft's TrainState
    state, metrics = setup.train_step(state, batch)                    # target params bound in, never updated

The target's parameters keep the shardings they were loaded with (its logical axes on the mesh) and are an argument
of the jitted steps, not a constant folded into them. The draft's own state (one layer, fc, FR head and their Adam
moments) is replicated: it is one layer of the target's width.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from data_pipeline.pipeline import make_train_iterator
from minicpm_jax.attention_plan import plan_attention
from minicpm_jax.config import ModelConfig
from minicpm_jax.speculative.draft import draft_layer_config, init_draft
from minicpm_jax.speculative.frspec import count_tokens, frequent_ids
from minicpm_jax.train.draft_loss import make_draft_eval_step, make_draft_train_step
from minicpm_jax.train.metrics import matmul_params, train_flops_per_token
from minicpm_jax.train.optimizer import make_optimizer
from minicpm_jax.train.step import BATCH_KEYS, StepSetup, abstract_state, batch_sharding, check_batch_layout


def draft_vocabulary(exp, prepared, cfg: ModelConfig) -> np.ndarray:
    """The FR-Spec ids (int32 [N], sorted) of a draft run: the most frequent ids of the first
    `draft.fr_count_batches` training batches (real tokens only, padding not counted), with the tokenizer's BOS,
    EOS and ChatML ids, the model's EOS ids and `draft.always_ids` forced in."""
    d, tok = exp.draft, prepared.tokenizer
    it = make_train_iterator(prepared, exp.data, process_index=0, process_count=1)
    counts = count_tokens((b["input_ids"][np.asarray(b["segment_ids"]) > 0]
                           for b in itertools.islice(it, d.fr_count_batches)), cfg.vocab_size)
    always = {tok.bos_id, tok.eos_id, *cfg.eos_ids, *d.always_ids}
    always |= {i for i in (tok.im_start_id, tok.im_end_id) if i is not None}
    size = d.fr_size or max(len(always), int(round(d.fr_fraction * cfg.vocab_size)))
    if size > cfg.vocab_size:
        raise ValueError(f"draft.fr_size={size} exceeds the target's vocabulary of {cfg.vocab_size}")
    return frequent_ids(counts, size, sorted(always))


def draft_flops_per_token(cfg: ModelConfig, fr_size: int, seq_len: int) -> float:
    """Model FLOPs per trained token of a draft run: the target's forward (a third of its train FLOPs) plus the
    draft layer's forward and backward (its matmuls, the 2h -> h fc and the h x N FR head, 6 FLOPs per weight)."""
    dcfg = draft_layer_config(cfg)
    layer = train_flops_per_token(dcfg, seq_len) - 6.0 * matmul_params(dcfg)   # the layer's attention part
    one_layer = matmul_params(dcfg) - dcfg.hidden_size * dcfg.vocab_size                # its head is the FR head
    return (train_flops_per_token(cfg, seq_len) / 3.0 + layer
            + 6.0 * (one_layer + 2 * cfg.hidden_size ** 2 + cfg.hidden_size * fr_size))


@dataclasses.dataclass
class DraftStepSetup(StepSetup):
    """`StepSetup` for a draft run: `cfg` is the target's, `plan` the target's attention for its features, the state
    is the draft's; plus the draft layer's config, the frozen target and the FR ids.

    train_step(state, batch) -> (state, metrics); eval_step(draft_params, batch) -> {"loss_sum", "target_tokens",
    "feature_loss_sum", "token_loss_sum", "fr_top1_sum"}: the target is bound in."""

    draft_cfg: Optional[ModelConfig] = None
    target_params: Any = None
    fr_ids: Optional[np.ndarray] = None
    head_from_target: bool = True

    def init_params(self, seed: int):
        """A fresh draft head (the FR head from the target's head at the FR ids with `draft.head_from_target`)."""
        d = init_draft(self.cfg, self.fr_ids, jax.random.key(seed),
                       self.target_params if self.head_from_target else None)
        return jax.device_put(d.params, self.state_shardings.params)


def build_draft_step(exp, cfg: ModelConfig, mesh, batch_shape: tuple[int, int], target_params,
                     fr_ids: np.ndarray) -> DraftStepSetup:
    """The jitted draft train / eval steps of experiment `exp` for the target (`cfg`, `target_params`, placed on
    `mesh`) at `batch_shape` = (global batch, seq_len). optim's μP rule applies to the draft's tensors as to a
    model's (the draft layer is a layer of the target's width)."""
    if exp.train.micro_batches != 1:
        raise ValueError("train.micro_batches: a draft run takes whole batches (set it to 1)")
    check_batch_layout(batch_shape[0], 1, mesh)
    attention = exp.model.attention
    plan = plan_attention(cfg, attention, batch_shape[1])
    fr_ids = np.asarray(fr_ids, np.int32)
    ap = jax.eval_shape(lambda: init_draft(cfg, fr_ids, jax.random.key(0)).params)
    dcfg = draft_layer_config(cfg)
    tx, schedule = make_optimizer(exp.optim, dcfg, ap, exp.train.steps)
    replicated = NamedSharding(mesh, P())
    st_sh = jax.tree.map(lambda _: replicated, abstract_state(ap, tx))
    tp_sh = jax.tree.map(lambda x: x.sharding, target_params)
    bsh = batch_sharding(mesh, batch_shape)
    batch_sh = {k: bsh for k in BATCH_KEYS}
    fr = jnp.asarray(fr_ids)
    weights = dict(feature_weight=exp.draft.feature_weight, token_weight=exp.draft.token_weight,
                   target_attention=attention)
    train = jax.jit(make_draft_train_step(cfg, dcfg, fr, tx, schedule=schedule, **weights),
                    in_shardings=(st_sh, tp_sh, batch_sh), out_shardings=(st_sh, replicated), donate_argnums=(0,))
    evaluate = jax.jit(make_draft_eval_step(cfg, dcfg, fr, **weights), in_shardings=(st_sh.params, tp_sh, batch_sh),
                       out_shardings=replicated)
    flops = draft_flops_per_token(cfg, int(fr_ids.size), batch_shape[1])
    return DraftStepSetup(
        cfg=cfg, mesh=mesh, plan=plan, batch_shape=tuple(batch_shape), abstract_params=ap, tx=tx,
        schedule=schedule, state_shardings=st_sh, batch_sharding=bsh,
        train_step=lambda state, batch: train(state, target_params, batch),
        eval_step=lambda params, batch: evaluate(params, target_params, batch),
        flops_per_token=flops, dense_flops_per_token=flops, draft_cfg=dcfg, target_params=target_params,
        fr_ids=fr_ids, head_from_target=exp.draft.head_from_target)
