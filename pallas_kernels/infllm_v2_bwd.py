"""InfLLM v2 block-sparse attention backward (dq, dk, dv) and the differentiable op (jax.custom_vjp).

dq:    same layout as the forward (one program per token x KV group, loop over the token's selected blocks),
       recomputing p from the saved log-sum-exp: dq = sum_blocks (p * (do.v^T - delta)) k * scale.
dk/dv: one program per (KV block, KV group, row) looping over the *transposed* block map: the chunks of Cq
       consecutive query tokens in which at least one token selected this block. Inside a chunk a token row is
       kept iff the block is in its list (checked against its idx row) and the key is causally visible, so
       every (token, block) pair of the forward is counted exactly once. The transposed map
       (qchunks [B,Hkv,NB,NQC], qcount [B,Hkv,NB]) is built in XLA from the block lists.
The reference (`infllm_v2_vjp_reference`) is jax.vjp of the dense reference forward.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import MASK_VALUE, block_start, compiler_params, next_pow2, pad_axis, pad_groups, \
    resolve_interpret, small_kv, unpad_groups
from pallas_kernels.infllm_v2_fwd import fwd_call, infllm_v2_fwd_reference, padded_rows, prepare_lists


# ----------------------------------------------------------------------------------------------------------- dq
def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, cnt_ref, pos_ref, dq_ref, *, block_size,
               kv_len, scale):
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    pos = pos_ref[()]
    bs = block_size
    kpos0 = jnp.arange(bs, dtype=jnp.int32)

    def body(s, dq):
        blk = idx_ref[s]
        start = block_start(blk, bs, kv_len)
        k = k_ref[pl.ds(start, bs), :]
        v = v_ref[pl.ds(start, bs), :]
        kpos = start + kpos0
        vis = (kpos >= blk * bs) & (kpos <= pos)
        sc = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        p = jnp.where(vis[None, :], jnp.exp(sc - lse[:, None]), 0.0)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None]) * scale
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, cnt_ref[()], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def dq_call(q, k, v, do, lse, delta, idx, count, pos, *, block_size, scale, interpret, num_warps=4, num_stages=2):
    """q/do [B,Tq,Hkv*Gp,D], lse/delta [B,Hkv,Tq,Gp] -> dq like q."""
    b, tq, hqp, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    gp = hqp // hkv
    kp = idx.shape[-1]
    row = pl.BlockSpec((None, None, gp, d), lambda t, g, i: (i, t, g, 0))
    kv = pl.BlockSpec((None, tk, None, d), lambda t, g, i: (i, 0, g, 0))
    vec = pl.BlockSpec((None, None, None, gp), lambda t, g, i: (i, g, t, 0))
    kernel = functools.partial(_dq_kernel, block_size=block_size, kv_len=tk, scale=scale)
    return pl.pallas_call(
        kernel, grid=(tq, hkv, b),
        in_specs=[row, kv, kv, row, vec, vec,
                  pl.BlockSpec((None, None, None, kp), lambda t, g, i: (i, g, t, 0)),
                  pl.BlockSpec((None, None, None), lambda t, g, i: (i, g, t)),
                  pl.BlockSpec((None, None), lambda t, g, i: (i, t))],
        out_specs=row, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params(interpret, num_warps, num_stages), interpret=interpret,
        name="infllm_v2_bwd_dq",
    )(q, k, v, do, lse, delta, idx, count, pos)


# ------------------------------------------------------------------------------------------------- dk / dv
def transposed_map(idx, count, n_blocks: int, chunk: int):
    """For every (row, group, KV block): the query chunks (of `chunk` tokens) holding a token that selected it.

    idx [B,Hkv,Tq,K], count [B,Hkv,Tq] -> (qchunks [B,Hkv,NB,NQC] int32 ascending, valid first; qcount [B,Hkv,NB]).
    """
    b, hkv, tq, kk = idx.shape
    nqc = -(-tq // chunk)
    ok = jnp.arange(kk) < count[..., None]
    blk = jnp.where(ok, idx, n_blocks)  # invalid slots -> out of range, dropped by the scatter
    c = jnp.broadcast_to((jnp.arange(tq) // chunk)[None, None, :, None], idx.shape)
    bi = jnp.broadcast_to(jnp.arange(b)[:, None, None, None], idx.shape)
    gi = jnp.broadcast_to(jnp.arange(hkv)[None, :, None, None], idx.shape)
    active = jnp.zeros((b, hkv, n_blocks, nqc), jnp.bool_).at[bi, gi, blk, c].set(True, mode="drop")
    qcount = active.sum(-1).astype(jnp.int32)
    slot = jnp.where(active, jnp.cumsum(active, axis=-1) - 1, nqc)
    ci = jnp.broadcast_to(jnp.arange(nqc, dtype=jnp.int32), active.shape)
    bi2 = jnp.arange(b)[:, None, None, None]
    gi2 = jnp.arange(hkv)[None, :, None, None]
    ni2 = jnp.arange(n_blocks)[None, None, :, None]
    qchunks = jnp.zeros(active.shape, jnp.int32).at[bi2, gi2, ni2, slot].set(ci, mode="drop")
    return qchunks, qcount


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, cnt_ref, pos_ref, qc_ref, qn_ref,
                 dk_ref, dv_ref, *, block_size, chunk, scale):
    bs = block_size
    blk = pl.program_id(0)
    kk = idx_ref.shape[-1]
    gq, d = q_ref.shape[1], q_ref.shape[2]
    k = k_ref[pl.ds(blk * bs, bs), :]
    v = v_ref[pl.ds(blk * bs, bs), :]
    kpos = blk * bs + jnp.arange(bs, dtype=jnp.int32)

    def body(i, carry):
        dk, dv = carry
        c = qc_ref[i]
        rows = pl.ds(c * chunk, chunk)
        q = q_ref[rows, :, :].reshape(chunk * gq, d)
        do = do_ref[rows, :, :].reshape(chunk * gq, d)
        lse = lse_ref[rows, :].reshape(chunk * gq)
        delta = delta_ref[rows, :].reshape(chunk * gq)
        ids = idx_ref[rows, :]                                        # [chunk, K]
        cnt = cnt_ref[rows]                                           # [chunk]
        pos = pos_ref[rows]                                           # [chunk]
        hit = (ids == blk) & (jnp.arange(kk, dtype=jnp.int32)[None, :] < cnt[:, None])
        member = jnp.max(hit.astype(jnp.int32), axis=1) > 0           # the token selected this block
        vis = member[:, None] & (kpos[None, :] <= pos[:, None])       # [chunk, bs]
        vis = jnp.broadcast_to(vis[:, None, :], (chunk, gq, bs)).reshape(chunk * gq, bs)
        sc = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        sc = jnp.where(vis, sc, MASK_VALUE)
        p = jnp.where(vis, jnp.exp(sc - lse[:, None]), 0.0)
        dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
        dp = jnp.dot(do, v.T, preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None]) * scale
        dk = dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32)
        return dk, dv

    zero = jnp.zeros((bs, d), jnp.float32)
    dk, dv = jax.lax.fori_loop(0, qn_ref[()], body, (zero, zero))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def dkdv_call(q, k, v, do, lse, delta, idx, count, pos, qchunks, qcount, *, block_size, chunk, scale, interpret,
              num_warps=4, num_stages=2):
    """q/do [B,Tqp,Hkv*Gd,D] (Tqp a multiple of chunk), lse/delta [B,Hkv,Tqp,Gd], k/v [B,NB*bs,Hkv,D]."""
    b, tqp, hqd, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    gd = hqd // hkv
    kp = idx.shape[-1]
    nb = tk // block_size
    nqc = qchunks.shape[-1]
    rows = pl.BlockSpec((None, tqp, gd, d), lambda n, g, i: (i, 0, g, 0))
    kv = pl.BlockSpec((None, tk, None, d), lambda n, g, i: (i, 0, g, 0))
    vec = pl.BlockSpec((None, None, tqp, gd), lambda n, g, i: (i, g, 0, 0))
    out = pl.BlockSpec((None, block_size, None, d), lambda n, g, i: (i, n, g, 0))
    kernel = functools.partial(_dkdv_kernel, block_size=block_size, chunk=chunk, scale=scale)
    return pl.pallas_call(
        kernel, grid=(nb, hkv, b),
        in_specs=[rows, kv, kv, rows, vec, vec,
                  pl.BlockSpec((None, None, tqp, kp), lambda n, g, i: (i, g, 0, 0)),
                  pl.BlockSpec((None, None, tqp), lambda n, g, i: (i, g, 0)),
                  pl.BlockSpec((None, tqp), lambda n, g, i: (i, 0)),
                  pl.BlockSpec((None, None, None, nqc), lambda n, g, i: (i, g, n, 0)),
                  pl.BlockSpec((None, None, None), lambda n, g, i: (i, g, n))],
        out_specs=[out, out],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=compiler_params(interpret, num_warps, num_stages), interpret=interpret,
        name="infllm_v2_bwd_dkdv",
    )(q, k, v, do, lse, delta, idx, count, pos, qchunks, qcount)


def dkdv_chunk(g: int, interpret: bool) -> int:
    """Query tokens per dk/dv step: 128 rows (chunk * G, >= 16 for tl.dot) on GPU; small in interpret mode.

    Smaller chunks waste less on tokens that did not pick the block (top-k picks scatter), larger ones feed the
    tensor cores better; 128 rows is the usual flash-attention M tile.
    """
    if interpret:
        return 4
    return max(1, 128 // next_pow2(g))


# --------------------------------------------------------------------------------------------- differentiable op
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def infllm_v2_attention_op(q, k, v, idx, count, pos, block_size: int, interpret: bool, min_rows: Optional[int],
                           sm_scale: Optional[float]):
    """Differentiable block-sparse attention: q [B,Tq,Hq,D], k/v [B,Tk,Hkv,D], block lists -> o [B,Tq,Hq,D]."""
    return _op_fwd(q, k, v, idx, count, pos, block_size, interpret, min_rows, sm_scale)[0]


def _op_fwd(q, k, v, idx, count, pos, block_size, interpret, min_rows, sm_scale):
    hkv = k.shape[2]
    g = q.shape[2] // hkv
    gp = padded_rows(g, interpret, min_rows)
    scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    idx_p, count_p = prepare_lists(idx, count, interpret)
    pos = pos.astype(jnp.int32)
    o, lse = fwd_call(pad_groups(q, hkv, gp), small_kv(k, block_size), small_kv(v, block_size), idx_p, count_p, pos,
                      block_size=block_size, scale=scale, interpret=interpret)
    o = unpad_groups(o, hkv, g)
    return o, (q, k, v, idx_p, count_p, pos, o, lse)


def _op_bwd(block_size, interpret, min_rows, sm_scale, res, do):
    q, k, v, idx, count, pos, o, lse = res
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    gp = lse.shape[-1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    delta = jnp.einsum("btnd,btnd->btn", do.astype(jnp.float32), o.astype(jnp.float32))
    delta = delta.reshape(b, tq, hkv, g).transpose(0, 2, 1, 3)                          # [B,Hkv,Tq,G]
    delta_p = pad_axis(delta, 3, gp)
    ks, vs = small_kv(k, block_size), small_kv(v, block_size)
    dq = dq_call(pad_groups(q, hkv, gp), ks, vs, pad_groups(do.astype(q.dtype), hkv, gp), lse, delta_p, idx, count,
                 pos, block_size=block_size, scale=scale, interpret=interpret)
    dq = unpad_groups(dq, hkv, g)
    # dk/dv: K/V padded to whole blocks (outputs are written per block), queries to whole chunks.
    nb = -(-tk // block_size)
    gd = next_pow2(g)
    cq = dkdv_chunk(g, interpret)
    tqp = -(-tq // cq) * cq
    qchunks, qcount = transposed_map(idx, count, nb, cq)
    kpad = pad_axis(k, 1, nb * block_size)
    vpad = pad_axis(v, 1, nb * block_size)
    qd = pad_axis(pad_groups(q, hkv, gd), 1, tqp)
    dod = pad_axis(pad_groups(do.astype(q.dtype), hkv, gd), 1, tqp)
    lse_d = pad_axis(pad_axis(lse[..., :g], 3, gd), 2, tqp)
    delta_d = pad_axis(pad_axis(delta, 3, gd), 2, tqp)
    idx_d = pad_axis(idx, 2, tqp)
    count_d = pad_axis(count, 2, tqp)          # padded tokens select nothing
    pos_d = pad_axis(pos, 1, tqp)
    dk, dv = dkdv_call(qd, kpad, vpad, dod, lse_d, delta_d, idx_d, count_d, pos_d, qchunks, qcount,
                       block_size=block_size, chunk=cq, scale=scale, interpret=interpret)
    return dq.astype(q.dtype), dk[:, :tk].astype(k.dtype), dv[:, :tk].astype(v.dtype), None, None, None


infllm_v2_attention_op.defvjp(_op_fwd, _op_bwd)


def infllm_v2_attention_pallas(q, k, v, idx, count, pos, *, block_size: int, interpret=None,
                               min_rows: Optional[int] = None, sm_scale: Optional[float] = None):
    """Public entry: differentiable w.r.t. q, k, v; idx/count/pos are integer block lists (no gradient)."""
    interpret = resolve_interpret(interpret)
    idx, count, pos = (jax.lax.stop_gradient(x) for x in (idx, count, pos))
    return infllm_v2_attention_op(q, k, v, idx, count, pos, block_size, interpret, min_rows, sm_scale)


def infllm_v2_vjp_reference(q, k, v, idx, count, pos, do, *, block_size: int, sm_scale: Optional[float] = None):
    """Reference (dq, dk, dv): jax.vjp of the dense masked reference forward."""
    f = lambda q_, k_, v_: infllm_v2_fwd_reference(q_, k_, v_, idx, count, pos, block_size=block_size,
                                                   sm_scale=sm_scale)[0]
    _, vjp = jax.vjp(f, q, k, v)
    return vjp(do)
