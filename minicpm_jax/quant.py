"""Ternary weight quantisation (BitCPM4-style QAT) with a straight-through estimator.

Each output unit's input weights are split into groups of `group_size` consecutive inputs (-1: the whole input
dim, i.e. one scale per output channel); a group's scale is `s = max(mean|w|, eps)` and its weights become
`clip(round(w / s), -1, 1) * s` (the BitCPM-CANN rule, spec §5.1). Gradients pass straight through to the latent
full-precision weights. Groups run along the input dim because GGUF's TQ1_0/TQ2_0 blocks are 256 consecutive inputs
of one output row with one scale each: with per-channel scales, or groups that are multiples of 256, the ternary
export is lossless (edge-export.md §4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-5


def _grouped(w: jnp.ndarray, in_dims: int, group_size: int):
    """View kernel [*in, *out] as [n_groups, group, out_flat]."""
    n_in = 1
    for s in w.shape[:in_dims]:
        n_in *= s
    g = n_in if group_size == -1 else group_size
    if n_in % g:
        raise ValueError(f"ternary quantisation: group_size {group_size} does not divide the input size {n_in} "
                         f"of a kernel with shape {w.shape}")
    return w.reshape(n_in // g, g, -1), n_in


def ternary_codes(w: jnp.ndarray, in_dims: int, group_size: int = -1):
    """Integer codes in {-1, 0, 1} (int8, shape of w) and scales [n_groups, out_flat] (float32)."""
    wg, _ = _grouped(w.astype(jnp.float32), in_dims, group_size)
    scale = jnp.maximum(jnp.mean(jnp.abs(wg), axis=1, keepdims=True), EPS)
    codes = jnp.clip(jnp.round(wg / scale), -1, 1)
    return codes.astype(jnp.int8).reshape(w.shape), scale[:, 0]


def ternary_values(w: jnp.ndarray, in_dims: int, group_size: int = -1) -> jnp.ndarray:
    """The ternary weights codes * scale (float32, shape of w): what the QAT forward multiplies by."""
    wg, _ = _grouped(w.astype(jnp.float32), in_dims, group_size)
    scale = jnp.maximum(jnp.mean(jnp.abs(wg), axis=1, keepdims=True), EPS)
    return (jnp.clip(jnp.round(wg / scale), -1, 1) * scale).reshape(w.shape)


def ternary_fake_quant(w: jnp.ndarray, in_dims: int, group_size: int = -1) -> jnp.ndarray:
    """Ternary-quantised w (same shape/dtype) with straight-through gradients."""
    q = ternary_values(w, in_dims, group_size).astype(w.dtype)
    return w + jax.lax.stop_gradient(q - w)
