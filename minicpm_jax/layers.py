"""Building blocks: RMSNorm, bias-free projections and the SwiGLU MLP, with logical sharding axis names.

Kernels are stored `[in..., out...]` (JAX convention); the HF converter transposes to torch's `[out, in]`.
Attention projections keep heads as their own axis (`[embed, heads, head_dim]`) so tensor parallelism shards heads.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from minicpm_jax.config import ModelConfig
from minicpm_jax.quant import ternary_fake_quant


def dtype_of(name: str):
    return jnp.dtype(name)


def hidden_init_std(cfg: ModelConfig) -> float:
    """μP init for hidden matrices: `initializer_range / sqrt(hidden_size / dim_model_base)`.

    `initializer_range` is the std tuned at the base width `dim_model_base`; a width-m model shrinks hidden weights by
    1/sqrt(m) so each pre-activation keeps the base model's scale (variance ∝ 1/fan_in, MiniCPM-1 / μP). Embeddings
    (input layer) keep `initializer_range` at every width, and so does an untied head: its 1/m μP factor is applied
    in the forward pass (the `÷ hidden_size/dim_model_base` before the head), not in the init. At the base width
    (tiny preset: hidden = dim_model_base = 256) every tensor is N(0, initializer_range), exactly HF's `_init_weights`.
    """
    return cfg.initializer_range / math.sqrt(cfg.width_mult)


class RMSNorm(nn.Module):
    """HF MiniCPMRMSNorm: statistics in float32, cast back to the compute dtype, then times the weight."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        w = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (cfg.hidden_size,), dtype_of(cfg.param_dtype))
        xf = x.astype(jnp.float32)
        var = jnp.mean(xf * xf, axis=-1, keepdims=True)
        y = (xf * jax.lax.rsqrt(var + cfg.rms_norm_eps)).astype(dtype_of(cfg.dtype))
        return w.astype(dtype_of(cfg.dtype)) * y


class Projection(nn.Module):
    """A bias-free linear map contracting the last `len(in_axes)` dims of x into `out_shape`.

    `in_axes` / `out_axes` are the logical axis names of the kernel `[*in_shape, *out_shape]`.
    """

    cfg: ModelConfig
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    std: float

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.std),
                                                                     self.in_axes + self.out_axes),
                            self.in_shape + self.out_shape, dtype_of(cfg.param_dtype))
        n_in = len(self.in_shape)
        if cfg.weight_quant == "ternary":            # QAT: forward with ternary weights, STE to the latent ones
            kernel = ternary_fake_quant(kernel, n_in, cfg.quant_group_size)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x.astype(dtype_of(cfg.dtype)), kernel.astype(dtype_of(cfg.dtype)),
                                   (contract, ((), ())))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        h, f, std = cfg.hidden_size, cfg.intermediate_size, hidden_init_std(cfg)
        gate = Projection(cfg, (h,), (f,), ("embed",), ("mlp",), std, name="gate_proj")(x)
        up = Projection(cfg, (h,), (f,), ("embed",), ("mlp",), std, name="up_proj")(x)
        act = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return Projection(cfg, (f,), (h,), ("mlp",), ("embed",), std, name="down_proj")(act)


def stack_axes(axes: Sequence[str | None]) -> tuple:
    return ("layers",) + tuple(axes)
