"""The lm-evaluation-harness backend: `minicpm_jax` as an lm-eval model, so any lm-eval task runs on our weights.

    import lm_eval, minicpm_jax.evals                       # importing the package registers "minicpm_jax"
    lm_eval.simple_evaluate(model="minicpm_jax", model_args="pretrained=runs/tiny,step=200,batch_size=8",
                            tasks=["minicpm_cloze_en"], task_manager=minicpm_jax.evals.task_manager())
    python -m minicpm_jax.evals.harness_cli run --model minicpm_jax --model_args pretrained=runs/tiny --tasks ...

Model arguments (`--model_args k=v,...`):
  pretrained    a training run directory (newest restorable checkpoint) or an HF checkpoint directory
                (`minicpm_jax.weights.load_weights` decides which)
  step          a run's checkpoint step (default: newest)
  attention     auto | dense | sparse (default: the run's model.attention; auto for HF checkpoints)
  batch_size    rows per forward / decode batch (default 8)
  max_length    the window for scoring and generation (default: max_position_embeddings); longer contexts lose
                their oldest tokens (left truncation), as lm-eval's HF backend does
  max_gen_toks  default generation budget when a task sets none (256)
  dtype         HF checkpoints only: float32 | bfloat16 | float16 (default: the checkpoint's torch_dtype)
  tokenizer     a tokenizer.model / tokenizer.json (directory) to use instead of the checkpoint's own
  add_bos_token prepend BOS to every context (default true: how the models are trained)
  seed          sampling seed for tasks that sample (default 0; greedy tasks ignore it)
  mesh.data, mesh.fsdp, mesh.tensor
                run on a device mesh of these sizes, read as the experiment config's `mesh.*` keys (axes not named:
                data 1, fsdp -1 = the rest, tensor 1): weights placed by the logical sharding rules, rows over
                data/fsdp, heads over tensor. From Python, `mesh=` also takes a `jax.sharding.Mesh` or a dict.
                Default: no explicit mesh (the weights on all local devices as one fsdp axis, as `load_weights`
                places them)

`loglikelihood` scores through `scoring.score_continuations` (one forward per batch, the vocabulary head only on
continuation positions); `generate_until` decodes through `generation.generate_until` (prefill + cached decode
steps, stopping at the task's stop strings or EOS); `apply_chat_template` uses the tokenizer's chat template
(ChatML for our runs) when lm-eval is asked to apply one (`--apply_chat_template`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any, Optional

import jax
from lm_eval.api.registry import register_model
from tqdm import tqdm

from data_pipeline.tokenizer import Tokenizer
from minicpm_jax.attention_plan import ATTENTION_MODES
from minicpm_jax.evals.generation import generate_until
from minicpm_jax.evals.lm_common import TokenizerLM, generation_groups, positive_int
from minicpm_jax.evals.scoring import score_continuations
from minicpm_jax.model import param_logical_axes
from minicpm_jax.sharding import axis_rules, logical_shardings, mesh_from_sizes
from minicpm_jax.weights import HF_DTYPES, Weights, load_weights, source_kind

log = logging.getLogger(__name__)


def _positive_int(name: str, value, allow_none: bool = False) -> Optional[int]:
    return positive_int("minicpm_jax", name, value, allow_none)


def mesh_from_args(mesh, unknown: dict[str, Any]) -> Optional[jax.sharding.Mesh]:
    """The mesh of `mesh=` (a Mesh, a {axis: size} dict or None) and of `mesh.<axis>=<size>` model arguments (popped
    from `unknown`; read as the experiment config's `mesh.*` keys, `sharding.mesh_from_sizes`); None when neither
    is given."""
    sizes = {k.split(".", 1)[1]: unknown.pop(k) for k in [k for k in unknown if k.startswith("mesh.")]}
    if isinstance(mesh, jax.sharding.Mesh):
        if sizes:
            raise ValueError("minicpm_jax: give mesh= or mesh.<axis>= model arguments, not both")
        return mesh
    sizes = {**(mesh or {}), **sizes}
    return mesh_from_sizes(sizes) if sizes else None


@register_model("minicpm_jax")
class MiniCPMLM(TokenizerLM):
    """An lm-eval LM over MiniCPM weights: a run directory (or one of its steps) or an HF directory."""

    backend = "causal"

    def __init__(self, pretrained: Optional[str] = None, step: Optional[int] = None, attention: Optional[str] = None,
                 batch_size: int | str = 8, max_length: Optional[int] = None, max_gen_toks: int = 256,
                 dtype: Optional[str] = None, tokenizer: Optional[str] = None, add_bos_token: bool = True,
                 seed: int = 0, weights: Optional[Weights] = None, max_batch_size: Optional[int] = None,
                 device: Optional[str] = None, mesh=None, **unknown: Any) -> None:
        super().__init__()
        self.mesh = mesh_from_args(mesh, unknown)
        if unknown:
            raise ValueError(f"minicpm_jax: unknown model arguments {sorted(unknown)}; known: pretrained, step, "
                             "attention, batch_size, max_length, max_gen_toks, dtype, tokenizer, add_bos_token, seed, "
                             "mesh.data, mesh.fsdp, mesh.tensor")
        if batch_size == "auto" or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            raise ValueError("minicpm_jax: batch_size=auto is not supported; give an integer")
        self.batch_size = _positive_int("batch_size", batch_size)          # cheap checks before loading weights
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks)
        if attention is not None and attention not in ATTENTION_MODES:
            raise ValueError(f"minicpm_jax: attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if device:
            log.info("minicpm_jax: device=%r ignored; JAX places the model on its default devices", device)
        if weights is None:
            if not pretrained:
                raise ValueError("minicpm_jax: give pretrained=<training run dir | HF checkpoint dir>")
            if dtype is not None and dtype not in HF_DTYPES:
                raise ValueError(f"minicpm_jax: dtype must be one of {sorted(HF_DTYPES)}, got {dtype!r}")
            if dtype is not None and source_kind(pretrained) != "hf":
                raise ValueError("minicpm_jax: dtype= applies to HF checkpoints; a training run loads in its own "
                                 "param dtype")
            if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
                raise ValueError(f"minicpm_jax model argument step must be an integer >= 0, got {step!r}")
            weights = load_weights(pretrained, step=step, dtype=HF_DTYPES[dtype] if dtype else None, mesh=self.mesh)
        elif self.mesh is not None:     # given weights go onto the mesh by the same rules as loaded ones
            weights = dataclasses.replace(weights, params=jax.device_put(weights.params, logical_shardings(
                weights.params, param_logical_axes(weights.cfg), self.mesh)))
        log.info("minicpm_jax: %s", weights.describe())
        self.weights = weights
        self.cfg, self.params = weights.cfg, weights.params
        self.attention = attention or weights.attention
        tok = Tokenizer.load(tokenizer) if tokenizer else weights.tokenizer
        if tok is None:
            raise ValueError(f"minicpm_jax: {weights.source} has no tokenizer (tokenizer.model / tokenizer.json); "
                             "pass tokenizer=<path>")
        if tok.vocab_size > self.cfg.vocab_size:
            raise ValueError(f"minicpm_jax: the tokenizer has {tok.vocab_size} pieces but the model only "
                             f"{self.cfg.vocab_size} embedding rows")
        self.tokenizer = tok
        self._max_length = _positive_int("max_length", max_length, allow_none=True) or self.cfg.max_position_embeddings
        if self._max_length > self.cfg.max_position_embeddings:
            raise ValueError(f"minicpm_jax: max_length={self._max_length} exceeds the model's "
                             f"max_position_embeddings={self.cfg.max_position_embeddings}")
        self.add_bos_token = bool(add_bos_token)
        self.eos_ids = sorted(set(self.cfg.eos_ids) | {tok.eos_id})
        self.seed = int(seed)

    def on_mesh(self):
        """The context the computations run in: the mesh and the logical sharding rules, or nothing without a mesh."""
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(axis_rules())
        return stack

    @property
    def source(self) -> str:
        """Where the weights came from (lm-eval task builders read it as `pretrained`)."""
        return str(self.weights.source)

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path or self.weights.source)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings or None, context ids, continuation ids)."""
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="minicpm_jax loglikelihood")
        with self.on_mesh():
            res = score_continuations(self.params, self.cfg, [(c, x) for _, c, x in requests],
                                      attention=self.attention, batch_size=self.batch_size,
                                      max_length=self.max_length, pad_id=self.tokenizer.pad_id, progress=bar.update)
        bar.close()
        return self._cache_loglikelihoods(requests, res)

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation kwargs, longest prompts first, `batch_size` rows per decode batch."""
        out: list[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="minicpm_jax generate_until")
        for g in generation_groups(requests, self.max_gen_toks, self.max_length, "minicpm_jax"):
            members, until, max_gen = g.members, g.until, g.max_gen
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen)
                       for i in members}
            order = sorted(members, key=lambda i: -len(prompts[i]))
            for s in range(0, len(order), self.batch_size):
                batch = order[s:s + self.batch_size]
                with self.on_mesh():
                    gens = generate_until(self.params, self.cfg, [prompts[i] for i in batch], self.tok_decode,
                                          stop=until, max_new_tokens=max_gen, eos_ids=self.eos_ids,
                                          attention=self.attention, temperature=g.temperature, top_k=g.top_k,
                                          top_p=g.top_p, seed=self.seed + s, pad_id=self.tokenizer.pad_id)
                for i, gen in zip(batch, gens):
                    out[i] = gen.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, gen.text)
                bar.update(len(batch))
        bar.close()
        return out

    def get_model_info(self) -> dict:
        return {"model_source": self.weights.describe(), "checkpoint_step": self.weights.step,
                "attention": self.attention, "max_length": self.max_length, "backend": "minicpm_jax",
                "mesh": None if self.mesh is None else dict(self.mesh.shape)}
