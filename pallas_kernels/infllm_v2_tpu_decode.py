"""InfLLM v2 sparse decode over a KV cache, TPU (Mosaic) Pallas kernel. Reference: `infllm_v2_decode_reference`.

Verified only in interpret mode on CPU and by lowering to Mosaic for the TPU platform; never compiled by Mosaic or
run on a TPU. Layout and padding rules: infllm_v2_tpu_common.py.

One query token per row (rows of different lengths). Grid (B, Hkv, S, P): row x KV group x split of the block
list x slot within the split (P = ceil(K / S)); the group's Gp query heads are the row tile, the K/V index_map
fetches the slot's block by id from the scalar-prefetched lists (row base, idx, count, pos: flat int32 in
SMEM), and an online softmax runs in VMEM scratch across the split's slots. Each split writes an unnormalised partial
(acc [Gp, D], m and l lane-replicated [Gp, 128]); `merge_splits` (shared with the GPU decode) combines them.
Splits exist so a batch-1 step still has B*Hkv*S independent ("parallel") programs for a megacore's two
TensorCores; S = 1 is the default (a single TensorCore walks the grid sequentially anyway).

  q   [B, Hkv*Gp, D]        block (Gp, D)       at (b, g)
  k/v kv_layout(cache)      block (bs, D)       at (base+b, g, idx[b,g,min(split*P + slot, count-1)])
  acc [B, Hkv, S, Gp, D]    block (Gp, D) f32;  m, l [B, Hkv, S, Gp, 128] block (Gp, 128) f32

The cache is read in place when D % 128 == 0 or Hkv == 1 (a free reshape to [B, S, Hkv*D]); otherwise kv_layout
makes a transposed copy every step (O(cache) traffic: prefer D % 128 == 0 on TPU). Keys past a row's length
(pos = length - 1) are masked and their V rows zeroed, so stale or uninitialised cache contents never matter.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import pad_groups, small_kv, unpad_groups
from pallas_kernels.infllm_v2_decode import infllm_v2_decode_reference, merge_splits  # noqa: F401
from pallas_kernels.infllm_v2_tpu_common import LANES, SMEM_WORDS, cdiv, compiler_params, kv_layout, kv_spec, \
    map_chunks, resolve_interpret, tokens_per_call, tpu_rows
from pallas_kernels.infllm_v2_tpu_fwd import init_softmax, online_softmax_step


def _decode_kernel(base_ref, idx_ref, cnt_ref, pos_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, m_sc, l_sc,
                   acc_sc, *, block_size, scale, hkv, n_slots, per_split):
    b, g, sp, s = (pl.program_id(i) for i in range(4))
    row = b * hkv + g
    slot = sp * per_split + s

    @pl.when(s == 0)
    def _init():
        init_softmax(m_sc, l_sc, acc_sc)

    @pl.when(slot < cnt_ref[row])
    def _step():
        online_softmax_step(q_ref[...], k_ref[...], v_ref[...], idx_ref[row * n_slots + slot], pos_ref[b],
                            m_sc, l_sc, acc_sc, block_size=block_size, scale=scale)

    @pl.when(s == per_split - 1)
    def _out():
        acc_ref[...] = acc_sc[...]
        m_ref[...] = m_sc[...]
        l_ref[...] = l_sc[...]


def decode_call(base, q, k_op, v_op, idx, count, pos, *, hkv, d, block_size, scale, num_splits, interpret):
    """Rows base .. base+Bc-1 of the cache. q [Bc,Hkv*Gp,D], idx [Bc,Hkv,K], count [Bc,Hkv], pos [Bc] int32,
    base [1] int32, k_op/v_op the whole cache (kv_layout) -> partials acc [Bc,Hkv,S,Gp,D], m/l [Bc,Hkv,S,Gp]."""
    b, hqp, _ = q.shape
    gp = hqp // hkv
    kk = idx.shape[-1]
    per = cdiv(kk, num_splits)

    n_rows = k_op.shape[0]

    def block(b_, g, sp, s, base_, idx_, cnt_, pos_):
        r = b_ * hkv + g
        slot = jnp.minimum(sp * per + s, jnp.maximum(cnt_[r] - 1, 0))
        return jnp.minimum(base_[0] + b_, n_rows - 1), g, idx_[r * kk + slot]  # padding rows: clamped, unused

    part = lambda *tail: pl.BlockSpec((None, None, None) + tail, lambda b_, g, sp, s, *_: (b_, g, sp, 0, 0))
    kv = kv_spec(hkv, d, block_size, block)
    kernel = functools.partial(_decode_kernel, block_size=block_size, scale=scale, hkv=hkv, n_slots=kk,
                               per_split=per)
    stat = jax.ShapeDtypeStruct((b, hkv, num_splits, gp, LANES), jnp.float32)
    acc, m, l = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4, grid=(b, hkv, num_splits, per),
            in_specs=[pl.BlockSpec((None, gp, d), lambda b_, g, sp, s, *_: (b_, g, 0)), kv, kv],
            out_specs=[part(gp, d), part(gp, LANES), part(gp, LANES)],
            scratch_shapes=[pltpu.VMEM((gp, LANES), jnp.float32), pltpu.VMEM((gp, LANES), jnp.float32),
                            pltpu.VMEM((gp, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((b, hkv, num_splits, gp, d), jnp.float32), stat, stat],
        compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="infllm_v2_tpu_decode",
    )(base, idx.reshape(-1), count.reshape(-1), pos.reshape(-1), q, k_op, v_op)
    return acc, m[..., 0], l[..., 0]


def infllm_v2_tpu_decode_kernel(q, k_cache, v_cache, idx, count, pos, *, block_size: int,
                                num_splits: Optional[int] = None, sm_scale: Optional[float] = None, interpret=None,
                                smem_words: int = SMEM_WORDS):
    """Sparse decode (TPU kernel). q [B,1,Hq,D]; k/v cache [B,S,Hkv,D]; idx [B,Hkv,1,K]; count [B,Hkv,1];
    pos [B,1] (= length - 1) -> [B,1,Hq,D] q.dtype. Large batches whose lists exceed the SMEM budget run as a
    lax.map over row chunks (the cache itself is not sliced: its rows are offset in the index_map)."""
    interpret = resolve_interpret(interpret)
    b, _, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    gp = tpu_rows(g, q.dtype)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    kk = idx.shape[-1]
    num_splits = max(1, min(num_splits or 1, kk))
    qp = pad_groups(q, hkv, gp)[:, 0]
    k_op = kv_layout(small_kv(k_cache, block_size))
    v_op = kv_layout(small_kv(v_cache, block_size))
    idx = idx[:, :, 0].astype(jnp.int32)
    count = count[:, :, 0].astype(jnp.int32)
    pos = pos[:, 0].astype(jnp.int32)
    rows = tokens_per_call(b, hkv * (kk + 1) + 1, smem_words)

    def fn(i, q_, idx_, cnt_, pos_):
        base = (i * rows).astype(jnp.int32).reshape(1)
        return decode_call(base, q_, k_op, v_op, idx_, cnt_, pos_, hkv=hkv, d=d, block_size=block_size,
                           scale=scale, num_splits=num_splits, interpret=interpret)

    acc, m, l = map_chunks(fn, (qp, idx, count, pos), (0,) * 4, b, rows, out_axes=(0, 0, 0))
    o = merge_splits(acc, m, l)                                             # [B,Hkv,Gp,D]
    return unpad_groups(o.reshape(b, 1, hkv * gp, d).astype(q.dtype), hkv, g)
