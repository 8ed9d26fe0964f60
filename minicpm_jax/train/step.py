"""The pure train and eval steps, their jitted sharded forms, and `build_step`: the one place they are assembled.

`train_step(state, batch) -> (state, metrics)` is a pure function of its inputs. Gradient accumulation is a
`lax.scan` over micro-batches inside the step; the loss is normalised by the number of target tokens of the whole
step (not averaged per micro-batch), so k micro-batches give exactly the gradient of one big batch.

`build_step(...)` -> `StepSetup`: mesh, attention plan, abstract params, optimizer and schedule, state and batch
shardings, the jitted train and eval steps and the model FLOPs per token. Training, the dry run, `minicpm bench
train` and `minicpm eval` all build their step here, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from minicpm_jax.attention_plan import AttentionPlan, plan_attention
from minicpm_jax.config import ModelConfig
from minicpm_jax.model import abstract_params, init_params, param_logical_axes
from minicpm_jax.sharding import logical_shardings, logical_to_spec, with_shardings
from minicpm_jax.train.config import OptimConfig
from minicpm_jax.train.loss import dense_rows, loss_sum_and_count
from minicpm_jax.train.metrics import train_flops_per_token
from minicpm_jax.train.mup import apply_init_multipliers, init_multipliers
from minicpm_jax.train.optimizer import make_optimizer

BATCH_KEYS = ("input_ids", "segment_ids", "positions", "loss_mask")


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: fp32 master weights; opt_state: optax state (same sharding as params)."""

    step: jnp.ndarray
    params: Any
    opt_state: Any


def split_micro(x: jnp.ndarray, m: int) -> jnp.ndarray:
    """[B, ...] -> [m, B/m, ...] taking every m-th row, so each micro-batch stays spread over the batch shards."""
    b = x.shape[0]
    if b % m:
        raise ValueError(f"global batch {b} is not divisible by train.micro_batches={m}")
    return x.reshape(b // m, m, *x.shape[1:]).swapaxes(0, 1)


def make_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformation, schedule: Callable, *,
                    micro_batches: int = 1, attention: str = "auto", loss_chunk: int = 2048):
    """The pure train step. Its metrics: loss, grad_norm, lr, target_tokens, and `dense_rows` (rows that ran dense)
    when rows choose dense / InfLLM v2 on their own true length (`AttentionPlan.per_row`)."""
    def loss_fn(params, batch):
        s, n = loss_sum_and_count(params, model_cfg, batch, attention=attention, chunk=loss_chunk)
        return s, n

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch):
        if micro_batches == 1:
            (loss_sum, count), grads = grad_fn(state.params, batch)
        else:
            def micro(carry, mb):
                ls, cnt, g = carry
                (l, n), gi = grad_fn(state.params, mb)
                return (ls + l, cnt + n, jax.tree.map(jnp.add, g, gi)), None
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            mbs = jax.tree.map(lambda x: split_micro(x, micro_batches), batch)
            (loss_sum, count, grads), _ = jax.lax.scan(micro, (jnp.float32(0), jnp.float32(0), zeros), mbs)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss_sum / denom, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step),
                   "target_tokens": count}
        if plan_attention(model_cfg, attention, batch["input_ids"].shape[1]).per_row:
            metrics["dense_rows"] = dense_rows(model_cfg, batch, attention=attention)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model_cfg: ModelConfig, *, attention: str = "auto", loss_chunk: int = 2048):
    def eval_step(params, batch):
        s, n = loss_sum_and_count(params, model_cfg, batch, attention=attention, chunk=loss_chunk)
        return {"loss_sum": s, "target_tokens": n}
    return eval_step


def batch_sharding(mesh, shape) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch", "seq"), shape, mesh))


def state_shardings(mesh, abstract_params, logical_axes, tx):
    """Shardings for TrainState: params by their logical axes, optimizer state following its params."""
    param_sh = logical_shardings(abstract_params, logical_axes, mesh)
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    # Adam's mu/nu mirror the params and take their shardings; counts and other scalars are replicated.
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_sh, opt_state=opt_sh)


def abstract_state(abstract_params, tx) -> TrainState:
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                      opt_state=jax.eval_shape(tx.init, abstract_params))


def jit_train_step(train_step, mesh, st_shardings, batch_shape):
    bsh = batch_sharding(mesh, batch_shape)
    batch_sh = {k: bsh for k in BATCH_KEYS}
    return jax.jit(train_step, in_shardings=(st_shardings, batch_sh),
                   out_shardings=(st_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


def jit_eval_step(eval_step, mesh, param_sh, batch_shape):
    bsh = batch_sharding(mesh, batch_shape)
    return jax.jit(eval_step, in_shardings=(param_sh, {k: bsh for k in BATCH_KEYS}),
                   out_shardings=NamedSharding(mesh, P()))


def check_batch_layout(global_batch: int, micro: int, mesh: Mesh) -> None:
    """The global batch splits into `micro` micro-batches, each over the mesh's batch shards (data x fsdp)."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % micro:
        raise ValueError(f"global batch {global_batch} (data.batch_size x processes) is not divisible by "
                         f"train.micro_batches={micro}")
    if (global_batch // micro) % shards:
        raise ValueError(f"micro-batch of {global_batch // micro} rows does not split over the {shards} batch shards "
                         f"(mesh data x fsdp); adjust data.batch_size, train.micro_batches or the mesh")


@dataclasses.dataclass
class StepSetup:
    """Everything a step needs, built once by `build_step`. Jitted callables: train_step(state, batch) ->
    (state, metrics); eval_step(params, batch) -> {"loss_sum", "target_tokens"}. Batches are dicts of int32
    [global_batch, seq_len] arrays with the keys BATCH_KEYS."""

    cfg: ModelConfig
    mesh: Mesh
    plan: AttentionPlan
    batch_shape: tuple[int, int]
    abstract_params: Any
    tx: optax.GradientTransformation
    schedule: Callable
    state_shardings: TrainState
    batch_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable
    flops_per_token: float            # model FLOPs per token when every row takes `plan`'s path (sparse: all rows)
    dense_flops_per_token: float      # ... when a row runs dense (per-row plans: rows shorter than dense_len)
    init_multipliers: Any = None      # per-leaf floats on the model's init (optim.mup_rule; None = all 1)

    def flops_per_step(self, dense_rows=None) -> float:
        """Model FLOPs of one step. dense_rows: the step's `metrics["dense_rows"]` (per-row plans), so that rows shorter
        than dense_len count dense attention over the row and the rest InfLLM v2; None: every row takes `plan`."""
        b, t = self.batch_shape
        if dense_rows is None:
            return self.flops_per_token * b * t
        return t * (dense_rows * self.dense_flops_per_token + (b - dense_rows) * self.flops_per_token)

    def abstract_state(self) -> TrainState:
        """The train state as sharded ShapeDtypeStructs (restore target, dry-run input)."""
        return with_shardings(abstract_state(self.abstract_params, self.tx), self.state_shardings)

    def abstract_batch(self) -> dict:
        return {k: jax.ShapeDtypeStruct(self.batch_shape, jnp.int32, sharding=self.batch_sharding)
                for k in BATCH_KEYS}

    def init_params(self, seed: int):
        """A fresh init: the model's μP init times the μP rule's extra factors (embedding / head under every_2d)."""
        params = init_params(self.cfg, jax.random.key(seed), mesh=self.mesh)
        return params if self.init_multipliers is None else apply_init_multipliers(params, self.init_multipliers)

    def init_state(self, params) -> TrainState:
        """Step 0 with `params` (already placed with their shardings) and fresh optimizer moments."""
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
        return TrainState(step=jax.device_put(jnp.int32(0), self.state_shardings.step), params=params,
                          opt_state=opt_state)


def build_step(cfg: ModelConfig, mesh: Mesh, batch_shape: tuple[int, int], *, attention: str = "auto",
               optim: OptimConfig = OptimConfig(), total_steps: int = 1, micro_batches: int = 1,
               loss_chunk: int = 2048) -> StepSetup:
    """Assemble the sharded train and eval steps for `cfg` on `mesh` at `batch_shape` = (global batch, seq_len)."""
    check_batch_layout(batch_shape[0], micro_batches, mesh)
    plan = plan_attention(cfg, attention, batch_shape[1])
    ap = abstract_params(cfg)
    tx, schedule = make_optimizer(optim, cfg, ap, total_steps)
    st_sh = state_shardings(mesh, ap, param_logical_axes(cfg), tx)
    train = jit_train_step(make_train_step(cfg, tx, schedule, micro_batches=micro_batches, attention=attention,
                                           loss_chunk=loss_chunk), mesh, st_sh, batch_shape)
    evaluate = jit_eval_step(make_eval_step(cfg, attention=attention, loss_chunk=loss_chunk), mesh, st_sh.params,
                             batch_shape)
    return StepSetup(cfg=cfg, mesh=mesh, plan=plan, batch_shape=tuple(batch_shape), abstract_params=ap, tx=tx,
                     schedule=schedule, state_shardings=st_sh, batch_sharding=batch_sharding(mesh, batch_shape),
                     train_step=train, eval_step=evaluate,
                     flops_per_token=train_flops_per_token(cfg, batch_shape[1], sparse=plan.sparse),
                     dense_flops_per_token=train_flops_per_token(cfg, batch_shape[1]),
                     init_multipliers=init_multipliers(cfg, ap, optim.mup, optim.mup_rule))
