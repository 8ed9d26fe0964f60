"""Rotary position embeddings in MiniCPM's layout: rotate-half (NeoX), computed in float32, with LongRoPE factors.

HF `MiniCPMLongRoPE`: the angle of frequency i at position t is `t * inv_freq[i] / ext[i]`, where `ext` is the
`long_factor` list when the cached length exceeds `original_max_position_embeddings` and `short_factor` otherwise,
and cos/sin are multiplied by `sqrt(1 + ln(max_pos / orig) / ln(orig))` (1.0 when the two lengths are equal).
HF builds its cache for `max_position_embeddings` and regrows it for longer inputs, so the cached length is
`max(max_position_embeddings, kv_len)`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from minicpm_jax.config import ModelConfig


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """`1 / theta^(2i/D)` for i in [0, D/2), float32 like HF (`torch.arange(0, D, 2).float() / D`)."""
    d = cfg.head_dim
    return (1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))).astype(np.float32)


def longrope_scaling(cfg: ModelConfig) -> float:
    """LongRoPE's cos/sin multiplier (HF `scaling_factor`); 1.0 without rope_scaling."""
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    scale = cfg.max_position_embeddings / rs.original_max_position_embeddings
    return math.sqrt(1.0 + math.log(scale) / math.log(rs.original_max_position_embeddings))


def rope_cos_sin(cfg: ModelConfig, positions: jnp.ndarray, kv_len) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables for the given positions.

    Args:
      positions: int [B, T] absolute positions.
      kv_len: total length of the key sequence, an int or an int array [B] (decode: per-row length). It picks the
        LongRoPE factor set exactly as HF's cache length does.
    Returns:
      (cos, sin): float32 [B, T, head_dim], already multiplied by the LongRoPE scaling.
    """
    base = jnp.asarray(inv_freq(cfg))                                 # [D/2]
    rs = cfg.rope_scaling
    if rs is None:
        freq = jnp.broadcast_to(base, (positions.shape[0], base.shape[0]))
    else:
        short = jnp.asarray(np.asarray(rs.short_factor, np.float32))
        long = jnp.asarray(np.asarray(rs.long_factor, np.float32))
        cached = jnp.maximum(cfg.max_position_embeddings, jnp.asarray(kv_len))
        use_long = jnp.broadcast_to(cached > rs.original_max_position_embeddings, (positions.shape[0],))
        ext = jnp.where(use_long[:, None], long[None], short[None])  # [B, D/2]
        freq = (1.0 / ext) * base[None]                               # HF: outer(t, 1/ext) * inv_freq
    angles = positions.astype(jnp.float32)[:, :, None] * freq[:, None, :]   # [B, T, D/2]
    emb = jnp.concatenate([angles, angles], axis=-1)
    scaling = longrope_scaling(cfg)
    return jnp.cos(emb) * scaling, jnp.sin(emb) * scaling


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [B, T, H, D] by cos/sin [B, T, D]; computed in float32, returned in x.dtype (HF semantics)."""
    xf = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (xf * c + rotate_half(xf) * s).astype(x.dtype)
