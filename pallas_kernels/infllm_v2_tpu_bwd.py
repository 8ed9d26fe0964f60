"""InfLLM v2 block-sparse attention backward (dq, dk, dv), TPU (Mosaic) Pallas kernels, and the differentiable op.

Verified only in interpret mode on CPU and by lowering to Mosaic for the TPU platform; never compiled by Mosaic or
run on a TPU. Reference: `infllm_v2_vjp_reference` (jax.vjp of the dense masked forward). Layout and padding
rules: infllm_v2_tpu_common.py. Same math as the GPU kernels (infllm_v2_bwd.py), p recomputed from the saved lse:
  dq = sum_blocks ds k,  dk = sum_queries ds^T q,  dv = sum_queries p^T do,  ds = p * (do.v^T - delta) * scale.

dq    grid (B, Hkv, Tq, K), the forward's layout: one token's Gp rows x the blocks of its list (fetched by id
      from the scalar-prefetched lists), dq accumulated in VMEM scratch, written at the last slot.
        q/do [B,Tq,Hkv*Gp,D] block (Gp, D); lse/delta [B,Tq,Hkv*Gp,128] block (Gp, 128); k/v block (bs, D).
dk/dv grid (B, Hkv, NB, NQC): one KV block x the query chunks (Cq consecutive tokens) that selected it, from the
      transposed block map the GPU path builds (`transposed_map`: qchunks [B,Hkv,NB,NQC], qcount [B,Hkv,NB]),
      scalar-prefetched; slots past qcount repeat the last chunk (no DMA) and are skipped.
        q/do block (Cq, Gp, D) -> Cq*Gp rows; lse/delta block (Cq, Gp, 128); the chunk's block lists
        [B,Hkv,Tq,K] block (Cq, K) (invalid slots = -1) decide which tokens selected this block;
        positions [B,Tq,128] lane-replicated block (Cq, 128); dk/dv (bs, D) f32 scratch, written at the last
        chunk slot. Cq is a multiple of 8 (sublane tile of the (Cq, K) and (Cq, 128) blocks), 128 rows by default.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._common import pad_axis, pad_groups, unpad_groups
from pallas_kernels.infllm_v2_bwd import infllm_v2_vjp_reference, transposed_map  # noqa: F401
from pallas_kernels.infllm_v2_tpu_common import LANES, SMEM_WORDS, SUBLANES, TRANS_B, cdiv, compiler_params, \
    kv_spec, kv_token_axis, kv_unlayout, lanes, map_chunks, resolve_interpret, tokens_per_call, \
    zero_rows_after
from pallas_kernels.infllm_v2_tpu_fwd import fwd_tpu, masked_scores, prepare, slot_block


# ----------------------------------------------------------------------------------------------------------- dq
def _dq_kernel(idx_ref, cnt_ref, pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, dq_sc, *,
               block_size, scale, hkv, tq, n_slots):
    b, g, t, s = (pl.program_id(i) for i in range(4))
    row = (b * hkv + g) * tq + t

    @pl.when(s == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(s < cnt_ref[row])
    def _step():
        blk = idx_ref[row * n_slots + s]
        pos = pos_ref[b * tq + t]
        k = zero_rows_after(k_ref[...], blk * block_size, pos)  # ds is 0 there, but 0 * NaN = NaN
        v = zero_rows_after(v_ref[...], blk * block_size, pos)
        sc, vis = masked_scores(q_ref[...], k, blk, pos, block_size=block_size, scale=scale)
        p = jnp.where(vis, jnp.exp(sc - lse_ref[:, :1]), 0.0)
        dp = jax.lax.dot_general(do_ref[...], v, TRANS_B, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[:, :1]) * scale
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(s == n_slots - 1)
    def _out():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def dq_call(q, k_op, v_op, do, lse, delta, idx, count, pos, *, hkv, d, block_size, scale, interpret):
    """q/do [B,Tq,Hkv*Gp,D], lse/delta [B,Tq,Hkv*Gp,128] f32, lists as in fwd_call -> dq like q."""
    b, tq, hqp, _ = q.shape
    gp = hqp // hkv
    kk = idx.shape[-1]
    where = functools.partial(slot_block, hkv=hkv, tq=tq, n_slots=kk)
    row = pl.BlockSpec((None, None, gp, d), lambda b_, g, t, s, *_: (b_, t, g, 0))
    vec = pl.BlockSpec((None, None, gp, LANES), lambda b_, g, t, s, *_: (b_, t, g, 0))
    kv = kv_spec(hkv, d, block_size, lambda b_, g, t, s, idx_, cnt_, pos_: (b_, g, where(b_, g, t, s, idx_, cnt_)))
    kernel = functools.partial(_dq_kernel, block_size=block_size, scale=scale, hkv=hkv, tq=tq, n_slots=kk)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, hkv, tq, kk), in_specs=[row, kv, kv, row, vec, vec], out_specs=row,
            scratch_shapes=[pltpu.VMEM((gp, d), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="infllm_v2_tpu_bwd_dq",
    )(idx.reshape(-1), count.reshape(-1), pos.reshape(-1), q, k_op, v_op, do, lse, delta)


# ------------------------------------------------------------------------------------------------- dk / dv
def _dkdv_kernel(base_ref, qc_ref, qn_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, ids_ref, pos_ref,
                 dk_ref, dv_ref, dk_sc, dv_sc, *, block_size, scale, hkv, nbc, nqc, kv_len):
    b, g, n, j = (pl.program_id(i) for i in range(4))
    blk = base_ref[0] + n                                   # global KV block id
    cq, gp, d = q_ref.shape
    rows = cq * gp

    @pl.when(j == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(j < qn_ref[(b * hkv + g) * nbc + n])
    def _step():
        k = k_ref[...]
        v = v_ref[...]
        if kv_len % block_size:                             # edge rows of a partial last block
            k = zero_rows_after(k, blk * block_size, kv_len - 1)
            v = zero_rows_after(v, blk * block_size, kv_len - 1)
        q = q_ref[...].reshape(rows, d)                     # Gp is whole sublane tiles: a free reshape
        do = do_ref[...].reshape(rows, d)
        lse = lse_ref[...].reshape(rows, LANES)[:, :1]
        delta = delta_ref[...].reshape(rows, LANES)[:, :1]
        # Token-level visibility [Cq, bs]: the token listed this block, and the key is not in its future.
        member = jnp.max((ids_ref[...] == blk).astype(jnp.float32), axis=1, keepdims=True) > 0.0
        kpos = blk * block_size + jax.lax.broadcasted_iota(jnp.int32, (cq, block_size), 1)
        tok_vis = jnp.where(member & (kpos <= pos_ref[:, :1]), 1.0, 0.0)
        vis = jnp.broadcast_to(tok_vis[:, None, :], (cq, gp, block_size)).reshape(rows, block_size) > 0.0
        sc = jax.lax.dot_general(q, k, TRANS_B, preferred_element_type=jnp.float32) * scale
        p = jnp.where(vis, jnp.exp(sc - lse), 0.0)          # where() selects: an inf from a hidden key is dropped
        dv_sc[...] += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = jax.lax.dot_general(do, v, TRANS_B, preferred_element_type=jnp.float32)
        ds = p * (dp - delta) * scale
        dk_sc[...] += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(j == nqc - 1)
    def _out():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def dkdv_call(base, q, k_op, v_op, do, lse, delta, ids, pos, qchunks, qcount, *, hkv, d, block_size, chunk, scale,
              kv_len, interpret):
    """KV blocks base .. base+NBc-1 (NBc = qchunks.shape[2]) -> (dk, dv) [.. NBc*bs ..] in the K/V layout.

    q/do [B,Tqp,Hkv*Gp,D] and lse/delta [B,Tqp,Hkv*Gp,128] (Tqp a multiple of chunk, padding rows zero),
    ids [B,Hkv,Tqp,K] int32 with -1 in unused slots, pos [B,Tqp,128] int32, qchunks [B,Hkv,NBc,NQC],
    qcount [B,Hkv,NBc], base [1] int32.
    """
    b, tqp, hqp, _ = q.shape
    gp = hqp // hkv
    kk = ids.shape[-1]
    nbc, nqc = qchunks.shape[2], qchunks.shape[3]
    nb_total = cdiv(kv_len, block_size)

    def chunk_of(b_, g, n, j, base_, qc, qn):
        r = (b_ * hkv + g) * nbc + n
        return qc[r * nqc + jnp.minimum(j, jnp.maximum(qn[r] - 1, 0))]

    rows = pl.BlockSpec((None, chunk, gp, d), lambda b_, g, n, j, *p: (b_, chunk_of(b_, g, n, j, *p), g, 0))
    vec = pl.BlockSpec((None, chunk, gp, LANES), lambda b_, g, n, j, *p: (b_, chunk_of(b_, g, n, j, *p), g, 0))
    ids_spec = pl.BlockSpec((None, None, chunk, kk), lambda b_, g, n, j, *p: (b_, g, chunk_of(b_, g, n, j, *p), 0))
    pos_spec = pl.BlockSpec((None, chunk, LANES), lambda b_, g, n, j, *p: (b_, chunk_of(b_, g, n, j, *p), 0))
    # Ranges padded past the last block read (clamped) block nb-1, compute nothing, and are cut by the caller.
    kv_in = kv_spec(hkv, d, block_size, lambda b_, g, n, j, base_, *_: (b_, g, jnp.minimum(base_[0] + n,
                                                                                            nb_total - 1)))
    kv_out = kv_spec(hkv, d, block_size, lambda b_, g, n, j, *_: (b_, g, n))
    tok_ax = kv_token_axis(hkv, d)
    out_shape = list(k_op.shape)
    out_shape[tok_ax] = nbc * block_size
    kernel = functools.partial(_dkdv_kernel, block_size=block_size, scale=scale, hkv=hkv, nbc=nbc, nqc=nqc,
                               kv_len=kv_len)
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, hkv, nbc, nqc),
            in_specs=[rows, kv_in, kv_in, rows, vec, vec, ids_spec, pos_spec], out_specs=[kv_out, kv_out],
            scratch_shapes=[pltpu.VMEM((block_size, d), jnp.float32), pltpu.VMEM((block_size, d), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(tuple(out_shape), k_op.dtype),
                   jax.ShapeDtypeStruct(tuple(out_shape), v_op.dtype)],
        compiler_params=compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret, name="infllm_v2_tpu_bwd_dkdv",
    )(base, qchunks.reshape(-1), qcount.reshape(-1), q, k_op, v_op, do, lse, delta, ids, pos)


def dkdv_chunk(gp: int) -> int:
    """Query tokens per dk/dv step: Cq*Gp = 128 rows (the MXU/flash-attention M tile), Cq a multiple of 8."""
    return max(SUBLANES, (128 // gp) // SUBLANES * SUBLANES)


def dkdv_tpu(q, k_op, v_op, do, lse, delta, idx, count, pos, *, hkv, d, block_size, scale, kv_len, interpret,
             smem_words: int = SMEM_WORDS, chunk: Optional[int] = None):
    """dk/dv over all KV blocks: builds the transposed map, pads queries to whole chunks, and splits the blocks
    into ranges whose transposed map fits the SMEM budget. Inputs as dq_call; returns (dk, dv) in K/V layout."""
    b, tq, hqp, _ = q.shape
    gp = hqp // hkv
    cq = chunk or dkdv_chunk(gp)
    nb = cdiv(kv_len, block_size)
    tqp = cdiv(tq, cq) * cq
    qchunks, qcount = transposed_map(idx, count, nb, cq)
    ids = jnp.where(jnp.arange(idx.shape[-1]) < count[..., None], idx, -1)
    ids = pad_axis(ids, 2, tqp, -1)                              # padding tokens select nothing
    pad_t = lambda x: pad_axis(x, 1, tqp)
    qd, dod, lsed, deltad = pad_t(q), pad_t(do), pad_t(lanes(lse)), pad_t(lanes(delta))
    posd = pad_t(lanes(pos))
    nqc = qchunks.shape[-1]
    nbc = min(nb, max(1, smem_words // (b * hkv * (nqc + 1))))
    tok_ax = kv_token_axis(hkv, d)

    def fn(i, qc, qn):
        base = (i * nbc).astype(jnp.int32).reshape(1)
        return dkdv_call(base, qd, k_op, v_op, dod, lsed, deltad, ids, posd, qc, qn, hkv=hkv, d=d,
                         block_size=block_size, chunk=cq, scale=scale, kv_len=kv_len, interpret=interpret)

    dk, dv = map_chunks(fn, (qchunks, qcount), (2, 2), nb, nbc, out_axes=(tok_ax, tok_ax),
                        out_len=nb * block_size)
    return jax.lax.slice_in_dim(dk, 0, kv_len, axis=tok_ax), jax.lax.slice_in_dim(dv, 0, kv_len, axis=tok_ax)


# --------------------------------------------------------------------------------------------- differentiable op
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def infllm_v2_tpu_attention_op(q, k, v, idx, count, pos, block_size: int, interpret, sm_scale: Optional[float],
                               smem_words: int):
    """Differentiable block-sparse attention (TPU kernels): q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D] -> o [B,Tq,Hq,D]."""
    return _op_fwd(q, k, v, idx, count, pos, block_size, interpret, sm_scale, smem_words)[0]


def _scale(d, sm_scale):
    return 1.0 / math.sqrt(d) if sm_scale is None else sm_scale


def _op_fwd(q, k, v, idx, count, pos, block_size, interpret, sm_scale, smem_words):
    hkv, d = k.shape[2], q.shape[3]
    g = q.shape[2] // hkv
    qp, k_op, v_op, idx_i, count_i, pos_i = prepare(q, k, v, idx, count, pos, block_size)
    o, lse = fwd_tpu(qp, k_op, v_op, idx_i, count_i, pos_i, hkv=hkv, d=d, block_size=block_size,
                     scale=_scale(d, sm_scale), interpret=interpret, smem_words=smem_words)
    o = unpad_groups(o, hkv, g)
    return o, (q, k, v, idx_i, count_i, pos_i, o, lse)


def _op_bwd(block_size, interpret, sm_scale, smem_words, res, do):
    q, k, v, idx, count, pos, o, lse = res
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = _scale(d, sm_scale)
    qp, k_op, v_op, _, _, _ = prepare(q, k, v, idx, count, pos, block_size)
    gp = qp.shape[2] // hkv
    dop = pad_groups(do.astype(q.dtype), hkv, gp)
    delta = jnp.einsum("btnd,btnd->btn", do.astype(jnp.float32), o.astype(jnp.float32))
    delta = pad_groups(delta[..., None], hkv, gp)[..., 0]                       # [B,Tq,Hkv*Gp]
    kw = dict(hkv=hkv, d=d, block_size=block_size, scale=scale, interpret=interpret)

    def dq_fn(i, q_, do_, lse_, delta_, idx_, cnt_, pos_):
        return (dq_call(q_, k_op, v_op, do_, lanes(lse_), lanes(delta_), idx_, cnt_, pos_, **kw),)

    chunk = tokens_per_call(tq, b * hkv * (idx.shape[-1] + 1) + b, smem_words)
    (dq,) = map_chunks(dq_fn, (qp, dop, lse, delta, idx, count, pos), (1, 1, 1, 1, 2, 2, 1), tq, chunk,
                       out_axes=(1,))
    kv_len = max(tk, block_size)                       # prepare() pads a sequence shorter than one block
    dk, dv = dkdv_tpu(qp, k_op, v_op, dop, lse, delta, idx, count, pos, kv_len=kv_len, smem_words=smem_words,
                      **kw)
    dk = kv_unlayout(dk, hkv, d)[:, :tk]
    dv = kv_unlayout(dv, hkv, d)[:, :tk]
    return unpad_groups(dq, hkv, hq // hkv).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


infllm_v2_tpu_attention_op.defvjp(_op_fwd, _op_bwd)


def infllm_v2_tpu_attention(q, k, v, idx, count, pos, *, block_size: int, interpret=None,
                            sm_scale: Optional[float] = None, smem_words: int = SMEM_WORDS):
    """Public entry (TPU kernels): differentiable w.r.t. q, k, v; idx/count/pos are integer lists (no gradient).

    q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], idx [B,Hkv,Tq,K], count [B,Hkv,Tq], pos [B,Tq] -> o [B,Tq,Hq,D] q.dtype.
    smem_words: scalar-prefetch budget per call (smaller -> more, smaller calls; tests use it to force chunking).
    """
    interpret = resolve_interpret(interpret)
    idx, count, pos = (jax.lax.stop_gradient(x) for x in (idx, count, pos))
    return infllm_v2_tpu_attention_op(q, k, v, idx, count, pos, block_size, interpret, sm_scale, smem_words)
