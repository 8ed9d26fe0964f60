"""InfLLM v2 sparse decode over a KV cache: Pallas kernel (split over the selected blocks) and its reference.

One new query token per batch row, rows of different lengths. A program handles (split, KV group, row): the
group's Gp query heads against its share of the row's selected blocks (flash-decoding style split-K: at batch 1
there are only Hkv programs otherwise). Each split writes an unnormalised partial (acc, m, l); a tiny XLA
epilogue merges them. K/V are read in place from the cache: a partial last block is read with a clamped start
and masked, so the cache is never copied or padded.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import attend_blocks, compiler_params, pad_groups, resolve_interpret, small_kv, \
    unpad_groups
from pallas_kernels.infllm_v2_fwd import infllm_v2_fwd_reference, padded_rows, prepare_lists


def _decode_kernel(q_ref, k_ref, v_ref, idx_ref, cnt_ref, pos_ref, acc_ref, m_ref, l_ref, *, block_size, kv_len,
                   scale, per_split):
    s = pl.program_id(0)
    n = cnt_ref[()]
    lo = jnp.minimum(s * per_split, n)
    hi = jnp.minimum(lo + per_split, n)
    acc, m, l = attend_blocks(q_ref[...], k_ref, v_ref, idx_ref, pos_ref[()], lo, hi, block_size=block_size,
                              kv_len=kv_len, scale=scale)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def decode_call(q, k_cache, v_cache, idx, count, pos, *, block_size, scale, num_splits, interpret, num_warps=4,
                num_stages=2):
    """q [B,Hkv*Gp,D], idx [B,Hkv,Kp], count [B,Hkv], pos [B] -> partials acc [B,Hkv,S,Gp,D], m/l [B,Hkv,S,Gp]."""
    b, hqp, d = q.shape
    s_len, hkv = k_cache.shape[1], k_cache.shape[2]
    gp = hqp // hkv
    kp = idx.shape[-1]
    per = -(-kp // num_splits)
    kernel = functools.partial(_decode_kernel, block_size=block_size, kv_len=s_len, scale=scale, per_split=per)
    part = lambda *tail: pl.BlockSpec((None, None, None) + tail, lambda s, g, i: (i, g, s) + (0,) * len(tail))
    return pl.pallas_call(
        kernel, grid=(num_splits, hkv, b),
        in_specs=[pl.BlockSpec((None, gp, d), lambda s, g, i: (i, g, 0)),
                  pl.BlockSpec((None, s_len, None, d), lambda s, g, i: (i, 0, g, 0)),
                  pl.BlockSpec((None, s_len, None, d), lambda s, g, i: (i, 0, g, 0)),
                  pl.BlockSpec((None, None, kp), lambda s, g, i: (i, g, 0)),
                  pl.BlockSpec((None, None), lambda s, g, i: (i, g)),
                  pl.BlockSpec((None,), lambda s, g, i: (i,))],
        out_specs=[part(gp, d), part(gp), part(gp)],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, gp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, num_splits, gp), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, num_splits, gp), jnp.float32)],
        compiler_params=compiler_params(interpret, num_warps, num_stages), interpret=interpret,
        name="infllm_v2_decode",
    )(q, k_cache, v_cache, idx, count, pos)


def merge_splits(acc, m, l):
    """Combine split partials: acc [..., S, G, D], m/l [..., S, G] -> [..., G, D] (empty splits have l = 0)."""
    mx = m.max(axis=-2, keepdims=True)
    w = jnp.exp(m - mx)
    num = (acc * w[..., None]).sum(axis=-3)
    den = (l * w).sum(axis=-2)
    return num / den[..., None]


def infllm_v2_decode_kernel(q, k_cache, v_cache, idx, count, pos, *, block_size: int, num_splits: Optional[int] = None,
                            sm_scale: Optional[float] = None, interpret=None, min_rows: Optional[int] = None):
    """Sparse decode. q [B,1,Hq,D]; k/v cache [B,S,Hkv,D]; idx [B,Hkv,1,K]; count [B,Hkv,1]; pos [B,1] -> [B,1,Hq,D]."""
    interpret = resolve_interpret(interpret)
    b, _, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    gp = padded_rows(g, interpret, min_rows)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    idx, count = prepare_lists(idx[:, :, 0], count[:, :, 0], interpret)
    if num_splits is None:
        num_splits = 1 if interpret else max(1, min(8, idx.shape[-1] // 8))
    qp = pad_groups(q, hkv, gp)[:, 0]
    acc, m, l = decode_call(qp, small_kv(k_cache, block_size), small_kv(v_cache, block_size), idx, count,
                            pos[:, 0].astype(jnp.int32), block_size=block_size, scale=scale, num_splits=num_splits,
                            interpret=interpret)
    o = merge_splits(acc, m, l)                           # [B,Hkv,Gp,D]
    o = o.reshape(b, 1, hkv * gp, d).astype(q.dtype)
    return unpad_groups(o, hkv, g)


def infllm_v2_decode_reference(q, k_cache, v_cache, idx, count, pos, *, block_size: int,
                               sm_scale: Optional[float] = None):
    """Plain-JAX reference: the dense masked forward with one query per row."""
    return infllm_v2_fwd_reference(q, k_cache, v_cache, idx, count, pos, block_size=block_size, sm_scale=sm_scale)[0]
