"""InfLLM v2 block-sparse attention forward: Pallas kernel and the plain-JAX reference it must match.

One program per (query token, KV group, batch row). Its row tile is that token's Gp query heads of the group (the
InfLLM layout: M = one token x its group's heads, padded with zero rows to Gp >= 16 on GPU where tl.dot needs
M >= 16); its inner loop visits only the token's `count` selected KV blocks, whose ids come from `idx`, loading
one block of K and V per step (N = block_size). Token-level causality is applied inside every visited block.
Outputs o and the log-sum-exp used by the backward pass.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import attend_blocks, compiler_params, next_pow2, pad_groups, pad_last, \
    resolve_interpret, small_kv, unpad_groups


def _fwd_kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, pos_ref, o_ref, lse_ref, *, block_size, kv_len, scale):
    q = q_ref[...]
    acc, m, l = attend_blocks(q, k_ref, v_ref, idx_ref, pos_ref[()], 0, cnt_ref[()], block_size=block_size,
                              kv_len=kv_len, scale=scale)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def fwd_call(q, k, v, idx, count, pos, *, block_size: int, scale: float, interpret: bool, num_warps: int = 4,
             num_stages: int = 2):
    """Raw kernel call on padded layouts: q [B,Tq,Hkv*Gp,D] -> (o like q, lse [B,Hkv,Tq,Gp] f32)."""
    b, tq, hqp, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    gp = hqp // hkv
    kp = idx.shape[-1]
    kernel = functools.partial(_fwd_kernel, block_size=block_size, kv_len=tk, scale=scale)
    return pl.pallas_call(
        kernel,
        grid=(tq, hkv, b),  # the token axis first: CUDA allows 2^31 programs on grid x, 65535 on y/z
        in_specs=[
            pl.BlockSpec((None, None, gp, d), lambda t, g, i: (i, t, g, 0)),
            pl.BlockSpec((None, tk, None, d), lambda t, g, i: (i, 0, g, 0)),
            pl.BlockSpec((None, tk, None, d), lambda t, g, i: (i, 0, g, 0)),
            pl.BlockSpec((None, None, None, kp), lambda t, g, i: (i, g, t, 0)),
            pl.BlockSpec((None, None, None), lambda t, g, i: (i, g, t)),
            pl.BlockSpec((None, None), lambda t, g, i: (i, t)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, gp, d), lambda t, g, i: (i, t, g, 0)),
            pl.BlockSpec((None, None, None, gp), lambda t, g, i: (i, g, t, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hkv, tq, gp), jnp.float32)],
        compiler_params=compiler_params(interpret, num_warps, num_stages),
        interpret=interpret,
        name="infllm_v2_fwd",
    )(q, k, v, idx, count, pos)


def padded_rows(g: int, interpret: bool, min_rows: Optional[int]) -> int:
    """Rows per program: the group padded to a power of two, and to >= 16 when compiled for GPU (tl.dot M)."""
    if min_rows is None:
        min_rows = 1 if interpret else 16
    return max(next_pow2(g), min_rows)


def prepare_lists(idx, count, interpret: bool):
    """Pad the block-list length to a power of two (Triton loads); padded entries are never read."""
    kp = next_pow2(idx.shape[-1])
    return pad_last(idx.astype(jnp.int32), kp), count.astype(jnp.int32)


def infllm_v2_fwd(q, k, v, idx, count, pos, *, block_size: int, sm_scale: Optional[float] = None, interpret=None,
                  min_rows: Optional[int] = None, num_warps: int = 4, num_stages: int = 2):
    """Block-sparse attention forward.

    q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], idx [B,Hkv,Tq,K] int32, count [B,Hkv,Tq] int32, pos [B,Tq] int32.
    Returns (o [B,Tq,Hq,D] q.dtype, lse [B,Hkv,Tq,G] f32).
    """
    interpret = resolve_interpret(interpret)
    hkv = k.shape[2]
    g = q.shape[2] // hkv
    gp = padded_rows(g, interpret, min_rows)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    idx, count = prepare_lists(idx, count, interpret)
    o, lse = fwd_call(pad_groups(q, hkv, gp), small_kv(k, block_size), small_kv(v, block_size), idx, count,
                      pos.astype(jnp.int32), block_size=block_size, scale=scale, interpret=interpret,
                      num_warps=num_warps, num_stages=num_stages)
    return unpad_groups(o, hkv, g), lse[..., :g]


def lists_to_token_mask(idx, count, pos, block_size: int, kv_len: int):
    """Dense visibility [B,Hkv,Tq,Tk] of block lists + token causality (reference helper)."""
    nb = -(-kv_len // block_size)
    slot_ok = jnp.arange(idx.shape[-1]) < count[..., None]
    blk = ((idx[..., None] == jnp.arange(nb)) & slot_ok[..., None]).any(-2)  # [B,Hkv,Tq,NB]
    kpos = jnp.arange(kv_len)
    return blk[..., kpos // block_size] & (kpos <= pos[:, None, :, None])


def infllm_v2_fwd_reference(q, k, v, idx, count, pos, *, block_size: int, sm_scale: Optional[float] = None):
    """Plain-JAX reference of `infllm_v2_fwd` (dense masked softmax): (o, lse) with the same shapes."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    mask = lists_to_token_mask(idx, count, pos, block_size, tk)
    qg = q.reshape(b, tq, hkv, g, d).astype(jnp.float32)
    s = jnp.einsum("btgnd,bsgd->bgtns", qg, k.astype(jnp.float32), precision="highest") * scale
    s = jnp.where(mask[:, :, :, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None])
    o = jnp.einsum("bgtns,bsgd->btgnd", p, v.astype(jnp.float32), precision="highest").reshape(b, tq, hq, d)
    return o.astype(q.dtype), lse
