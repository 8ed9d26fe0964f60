"""InfLLM v2 block-sparse attention forward, TPU (Mosaic) Pallas kernel. Reference: `infllm_v2_fwd_reference`.

Verified only in interpret mode on CPU (`interpret=True` and `pltpu.InterpretParams()`) and by lowering to Mosaic
for the TPU platform; never compiled by Mosaic or run on a TPU (none was available). Layout and padding rules:
infllm_v2_tpu_common.py.

Grid (B, Hkv, Tq, K): one program per (row, KV group, query token, slot of the token's block list). The row tile
is the token's Gp query heads of the group (InfLLM's M tile: one token x its group), the slot axis walks the
token's selected KV blocks, which the K/V index_map fetches by id from the scalar-prefetched lists
(`pltpu.PrefetchScalarGridSpec`, num_scalar_prefetch=3: idx, count, pos, all flat int32 in SMEM):

  q   [B, Tq, Hkv*Gp, D]   block (Gp, D)        at (b, t, g)
  k/v kv_layout operand    block (bs, D)        at (b, g, idx[b,g,t,min(s, count-1)])
  o   like q               block (Gp, D)        written at the last slot
  lse [B, Tq, Hkv*Gp, 128] block (Gp, 128) f32  lane-replicated, written at the last slot
  scratch (VMEM): m, l (Gp, 128) f32 lane-replicated, acc (Gp, D) f32: online softmax across slots.

Slots past a token's count repeat its last block id, so the pipeline sees an unchanged block index and issues no
DMA, and the step is skipped with pl.when. Keys are masked by absolute position (key <= the token's position):
causal inside the diagonal block and the edge rows of a partial last block.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import MASK_VALUE, pad_groups, small_kv, unpad_groups
from pallas_kernels.infllm_v2_fwd import infllm_v2_fwd_reference  # noqa: F401  (the reference this must match)
from pallas_kernels.infllm_v2_tpu_common import LANES, SMEM_WORDS, TRANS_B, compiler_params, kv_layout, kv_spec, \
    map_chunks, resolve_interpret, tokens_per_call, tpu_rows, zero_rows_after


def slot_block(b, g, t, s, idx, cnt, *, hkv: int, tq: int, n_slots: int):
    """Block id for grid slot s of token t (clamped to the token's last valid slot: no refetch past count)."""
    row = (b * hkv + g) * tq + t
    last = jnp.maximum(cnt[row] - 1, 0)
    return idx[row * n_slots + jnp.minimum(s, last)]


def masked_scores(q, k, blk, pos, *, block_size: int, scale: float):
    """q [R, D] x k [bs, D] -> (scores [R, bs] f32 with invisible keys at MASK_VALUE, visibility [R, bs])."""
    sc = jax.lax.dot_general(q, k, TRANS_B, preferred_element_type=jnp.float32) * scale
    kpos = blk * block_size + jax.lax.broadcasted_iota(jnp.int32, sc.shape, 1)
    vis = kpos <= pos
    return jnp.where(vis, sc, MASK_VALUE), vis


def online_softmax_step(q, k, v, blk, pos, m_sc, l_sc, acc_sc, *, block_size: int, scale: float):
    """One KV block of flash attention into the VMEM accumulators (m, l lane-replicated [R, 128])."""
    v = zero_rows_after(v, blk * block_size, pos)  # edge/garbage rows: p = 0 there, but 0 * NaN = NaN
    sc, _ = masked_scores(q, k, blk, pos, block_size=block_size, scale=scale)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, sc.max(axis=-1, keepdims=True))          # [R, 128]
    p = jnp.exp(sc - m_new[:, :1])
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + p.sum(axis=-1, keepdims=True)
    acc_sc[...] = alpha[:, :1] * acc_sc[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    m_sc[...] = m_new


def init_softmax(m_sc, l_sc, acc_sc):
    m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)


def _fwd_kernel(idx_ref, cnt_ref, pos_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                block_size, scale, hkv, tq, n_slots):
    b, g, t, s = (pl.program_id(i) for i in range(4))
    row = (b * hkv + g) * tq + t

    @pl.when(s == 0)
    def _init():
        init_softmax(m_sc, l_sc, acc_sc)

    @pl.when(s < cnt_ref[row])
    def _step():
        online_softmax_step(q_ref[...], k_ref[...], v_ref[...], idx_ref[row * n_slots + s], pos_ref[b * tq + t],
                            m_sc, l_sc, acc_sc, block_size=block_size, scale=scale)

    @pl.when(s == n_slots - 1)
    def _out():
        l = l_sc[...]
        safe = jnp.where(l == 0.0, 1.0, l)  # l = 0 only for padding tokens with an empty list
        o_ref[...] = (acc_sc[...] / safe[:, :1]).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l)


def fwd_call(q, k_op, v_op, idx, count, pos, *, hkv: int, d: int, block_size: int, scale: float, interpret):
    """One pallas_call. q [B,Tq,Hkv*Gp,D]; k_op/v_op from kv_layout; idx [B,Hkv,Tq,K], count [B,Hkv,Tq],
    pos [B,Tq] int32 -> (o like q, lse [B,Tq,Hkv*Gp] f32)."""
    b, tq, hqp, _ = q.shape
    gp = hqp // hkv
    kk = idx.shape[-1]
    where = functools.partial(slot_block, hkv=hkv, tq=tq, n_slots=kk)
    row_spec = pl.BlockSpec((None, None, gp, d), lambda b_, g, t, s, *_: (b_, t, g, 0))
    kv = kv_spec(hkv, d, block_size, lambda b_, g, t, s, idx_, cnt_, pos_: (b_, g, where(b_, g, t, s, idx_, cnt_)))
    lse_spec = pl.BlockSpec((None, None, gp, LANES), lambda b_, g, t, s, *_: (b_, t, g, 0))
    kernel = functools.partial(_fwd_kernel, block_size=block_size, scale=scale, hkv=hkv, tq=tq, n_slots=kk)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, hkv, tq, kk),
            in_specs=[row_spec, kv, kv], out_specs=[row_spec, lse_spec],
            scratch_shapes=[pltpu.VMEM((gp, LANES), jnp.float32), pltpu.VMEM((gp, LANES), jnp.float32),
                            pltpu.VMEM((gp, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, tq, hqp, LANES), jnp.float32)],
        compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="infllm_v2_tpu_fwd",
    )(idx.reshape(-1), count.reshape(-1), pos.reshape(-1), q, k_op, v_op)
    return o, lse[..., 0]


def fwd_tpu(q, k_op, v_op, idx, count, pos, *, hkv: int, d: int, block_size: int, scale: float, interpret,
            smem_words: int = SMEM_WORDS):
    """fwd_call over query-token chunks whose block lists fit the SMEM budget (one call when they fit)."""
    b, tq = q.shape[:2]
    chunk = tokens_per_call(tq, b * hkv * (idx.shape[-1] + 1) + b, smem_words)
    fn = lambda i, q_, idx_, cnt_, pos_: fwd_call(q_, k_op, v_op, idx_, cnt_, pos_, hkv=hkv, d=d,
                                                  block_size=block_size, scale=scale, interpret=interpret)
    return map_chunks(fn, (q, idx, count, pos), (1, 2, 2, 1), tq, chunk, out_axes=(1, 1))


def prepare(q, k, v, idx, count, pos, block_size: int):
    """Kernel operands from the public layout: padded query groups, K/V layout, int32 lists."""
    hkv = k.shape[2]
    gp = tpu_rows(q.shape[2] // hkv, q.dtype)
    return (pad_groups(q, hkv, gp), kv_layout(small_kv(k, block_size)), kv_layout(small_kv(v, block_size)),
            idx.astype(jnp.int32), count.astype(jnp.int32), pos.astype(jnp.int32))


def infllm_v2_tpu_fwd(q, k, v, idx, count, pos, *, block_size: int, sm_scale: Optional[float] = None,
                      interpret=None, smem_words: int = SMEM_WORDS):
    """Block-sparse attention forward (TPU kernel).

    q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], idx [B,Hkv,Tq,K] int32 (entries >= count ignored), count [B,Hkv,Tq],
    pos [B,Tq] absolute query positions. Returns (o [B,Tq,Hq,D] q.dtype, lse [B,Hkv,Tq,G] f32), like
    `infllm_v2_fwd_reference`.
    """
    interpret = resolve_interpret(interpret)
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    qp, k_op, v_op, idx, count, pos = prepare(q, k, v, idx, count, pos, block_size)
    o, lse = fwd_tpu(qp, k_op, v_op, idx, count, pos, hkv=hkv, d=d, block_size=block_size, scale=scale,
                     interpret=interpret, smem_words=smem_words)
    gp = qp.shape[2] // hkv
    lse = lse.reshape(b, tq, hkv, gp)[..., :g].transpose(0, 2, 1, 3)
    return unpad_groups(o, hkv, g), lse
