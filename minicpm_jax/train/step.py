"""The pure train and eval steps, and their jitted, sharded forms.

`train_step(state, batch) -> (state, metrics)` is a pure function of its inputs. Gradient accumulation is a
`lax.scan` over micro-batches inside the step; the loss is normalised by the number of target tokens of the whole
step (not averaged per micro-batch), so k micro-batches give exactly the gradient of one big batch.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from minicpm_jax.config import ModelConfig
from minicpm_jax.sharding import logical_shardings, logical_to_spec
from minicpm_jax.train.loss import loss_sum_and_count

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


def with_shardings(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def jit_train_step(train_step, mesh, st_shardings, batch_shape):
    bsh = batch_sharding(mesh, batch_shape)
    batch_sh = {k: bsh for k in BATCH_KEYS}
    return jax.jit(train_step, in_shardings=(st_shardings, batch_sh),
                   out_shardings=(st_shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


def jit_eval_step(eval_step, mesh, param_sh, batch_shape):
    bsh = batch_sharding(mesh, batch_shape)
    return jax.jit(eval_step, in_shardings=(param_sh, {k: bsh for k in BATCH_KEYS}),
                   out_shardings=NamedSharding(mesh, P()))
