"""InfLLM v2 stage 4 in plain XLA: memory-bounded, differentiable (custom_vjp), runs anywhere.

Queries are processed in chunks of C tokens (lax.scan). Each chunk attends two disjoint key sets whose softmax is
merged exactly (online softmax):
  * the local window: the same contiguous band of keys for every token of the chunk (blocks qb-n+1 .. qb), so it
    is a dynamic_slice, not a gather, and one [C*G, D] x [D, band] matmul per group;
  * the top-k picks (init blocks included), `sub` list slots at a time: one gather slice per (group, token,
    block) into [C, sub, block, D], then a batched [G, D] x [D, sub*block] matmul per token. Picks lie strictly
    before the window, so only an init block that is the query's own block needs the causal mask.
Decode (one query) gathers every listed block at once instead (_chunk_fwd_all_blocks).
Nothing is padded (except a sequence shorter than one block): a partial last block is gathered from a clamped
start and every key is masked by its absolute position. Gradients: the backward pass recomputes the probabilities
per chunk from the saved log-sum-exp (flash-attention style) and scatter-adds dk/dv, so residuals are O(T).
Matmuls use the default precision: exact fp32 on CPU; on GPU XLA may use TF32 for fp32 inputs (the Pallas
kernels are the GPU path).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from minicpm_jax.sparse.config import SparseConfig
from minicpm_jax.sparse.select import BlockLists

_HI = None  # default matmul precision (see the module docstring)


def window_width(tk: int, chunk: int, cfg: SparseConfig) -> int:
    """Keys in the contiguous band covering the windows of `chunk` consecutive queries (clamped to Tk)."""
    bs = cfg.block_size
    return min(tk, (cfg.window_blocks - 1 + (chunk - 1) // bs + 2) * bs)


def _block_dnums():
    # operand [B, Tk, Hkv, D]; index vectors (b, start, g) -> one [bs, D] slice per (b, group, query, slot)
    return jax.lax.GatherDimensionNumbers(offset_dims=(4, 5), collapsed_slice_dims=(0, 2), start_index_map=(0, 1, 2))


def _block_starts(k, idx, bs):
    """Start indices [B,Hkv,C,K,3] of the selected blocks and the key positions [B,Hkv,C,K,bs] they read.

    The start of a partial last block is clamped to Tk - bs (so nothing is padded); the rows this brings in belong
    to the previous block and are masked by `pos >= idx * bs` wherever the blocks are used.
    """
    b, tk, hkv, _ = k.shape
    start = jnp.clip(idx * bs, 0, max(tk - bs, 0))
    shape = idx.shape
    bi = jnp.broadcast_to(jnp.arange(b)[:, None, None, None], shape)
    gi = jnp.broadcast_to(jnp.arange(hkv)[None, :, None, None], shape)
    starts = jnp.stack([bi, start, gi], axis=-1)
    pos = start[..., None] + jnp.arange(bs, dtype=jnp.int32)
    return starts, pos


def _gather_top(k, idx_top, bs):
    """k [B,Tk,Hkv,D], idx_top [B,Hkv,C,kt] -> blocks [B,Hkv,C,kt,bs,D], key positions [B,Hkv,C,kt,bs], starts.

    One gather slice per block (not per key): far fewer indices for XLA to walk.
    """
    d = k.shape[-1]
    starts, pos = _block_starts(k, idx_top, bs)
    blocks = jax.lax.gather(k, starts, _block_dnums(), slice_sizes=(1, bs, 1, d),
                            mode=jax.lax.GatherScatterMode.CLIP)
    # Materialise the gathered blocks: left fusible, XLA:CPU re-gathers inside the consuming dot/reductions.
    return jax.lax.optimization_barrier(blocks), pos, starts


def _scatter_add_blocks(acc, starts, upd):
    """Inverse of _gather_top for gradients: acc [B,Tk,Hkv,D] += upd [B,Hkv,C,kt,bs,D] at the block starts."""
    dn = jax.lax.ScatterDimensionNumbers(update_window_dims=(4, 5), inserted_window_dims=(0, 2),
                                         scatter_dims_to_operand_dims=(0, 1, 2))
    return jax.lax.scatter_add(acc, starts, upd, dn, mode=jax.lax.GatherScatterMode.CLIP)


def _window(k, t, cfg: SparseConfig, w: int):
    """Band of keys [B,W,Hkv,D] holding every window key of the chunk's queries t [B,C], and its positions [B,W]."""
    tk = k.shape[1]
    bs, n = cfg.block_size, cfg.window_blocks
    s0 = (t[:, 0] // bs - n + 1) * bs
    start = jnp.clip(s0, 0, tk - w)
    band = jax.vmap(lambda kk, st: jax.lax.dynamic_slice_in_dim(kk, st, w, axis=0))(k, start)
    return band, start[:, None] + jnp.arange(w, dtype=jnp.int32)[None]


# Layouts inside a chunk (batch dims lead in every operand, so each einsum is a plain batched matmul on XLA:CPU;
# a 5-D einsum whose batch dims sit in different places falls back to a slow loop emitter):
#   qm   [B, Hkv, C, G, D]        queries of the chunk, grouped
#   kb   [B, Hkv, C, sub*bs, D]   gathered top-k keys of `sub` list slots, per token
#   kw   [B, Hkv, W, D]           window band, shared by the chunk (matmul rows are C*G)
# The top-k slots are visited `sub` at a time with an online softmax (flash style): gathering all ~64 blocks of
# every token at once makes [C, 64, 64, D] temporaries that fall out of cache and run 2-3x slower on a CPU.
def _group(x, hkv):
    """[B,C,Hq,D] -> [B,Hkv,C,G,D] float32."""
    b, c, hq, d = x.shape
    return x.reshape(b, c, hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4).astype(jnp.float32)


def _to_tokens(x, b, c, hq, d):
    """[B,Hkv,C,G,D] -> [B,C,Hq,D]."""
    return x.transpose(0, 2, 1, 3, 4).reshape(b, c, hq, d)


def _band(x, kw):
    """[B,Hkv,C,G,D] x [B,Hkv,W,D] -> [B,Hkv,C,G,W] as one matmul with C*G rows per group."""
    b, h, c, g, d = x.shape
    return jnp.einsum("bhmd,bhwd->bhmw", x.reshape(b, h, c * g, d), kw, precision=_HI).reshape(b, h, c, g, -1)


def _band_t(p, vw):
    """[B,Hkv,C,G,W] x [B,Hkv,W,D] -> [B,Hkv,C,G,D]."""
    b, h, c, g, w = p.shape
    return jnp.einsum("bhmw,bhwd->bhmd", p.reshape(b, h, c * g, w), vw, precision=_HI).reshape(b, h, c, g, -1)


def _window_parts(qm, tc, k, v, cfg, w, scale):
    """Window band keys/values [B,Hkv,W,D], its start [B], and the masked logits [B,Hkv,C,G,W]."""
    k_w, pos_w = _window(k, tc, cfg, w)
    v_w, _ = _window(v, tc, cfg, w)
    k_w = k_w.transpose(0, 2, 1, 3).astype(jnp.float32)
    v_w = v_w.transpose(0, 2, 1, 3).astype(jnp.float32)
    bs, n = cfg.block_size, cfg.window_blocks
    qb = (tc // bs)[:, :, None]
    kb = (pos_w // bs)[:, None, :]
    m_w = (kb > qb - n) & (kb <= qb) & (kb >= cfg.init_blocks) & (pos_w[:, None, :] <= tc[:, :, None])  # [B,C,W]
    s_w = jnp.where(m_w[:, None, :, None, :], _band(qm, k_w) * scale, -jnp.inf)
    return k_w, v_w, pos_w[:, 0], s_w


def _top_parts(qm, tc, ids, slot0, n_top, k, v, bs, scale):
    """Top-k slots slot0 .. slot0+sub-1: gathered K/V [B,Hkv,C,sub*bs,D], block starts, masked logits."""
    b, h, c, g, d = qm.shape
    sub = ids.shape[-1]
    kb, pos, starts = _gather_top(k, ids, bs)
    vb = _gather_top(v, ids, bs)[0]
    kb = kb.reshape(b, h, c, sub * bs, d).astype(jnp.float32)
    vb = vb.reshape(b, h, c, sub * bs, d).astype(jnp.float32)
    ok = ((slot0 + jnp.arange(sub)) < n_top[..., None])[..., None] & (pos >= (ids * bs)[..., None]) & \
        (pos <= tc[:, None, :, None, None])
    s = jnp.einsum("bhcnd,bhcsd->bhcns", qm, kb, precision=_HI) * scale
    s = jnp.where(ok.reshape(b, h, c, 1, sub * bs), s, -jnp.inf)
    return kb, vb, starts, s


def _finite(m):
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _chunk_fwd(qc, tc, idx_top, n_top, k, v, cfg, w, sub):
    """One chunk: qc [B,C,Hq,D] at positions tc [B,C] -> out [B,C,Hq,D] f32 and lse [B,Hkv,C,G]."""
    b, c, hq, d = qc.shape
    hkv = k.shape[2]
    scale = 1.0 / math.sqrt(d)
    qm = _group(qc, hkv)
    _, v_w, _, s_w = _window_parts(qm, tc, k, v, cfg, w, scale)
    # m is the true running max: -inf while a token has seen no key (its window is empty when qb < init_blocks;
    # the own block is then a top-k pick). Exponents use a finite stand-in, never a placeholder max: a fake max of
    # 0 would underflow exp(s - 0) to 0 for logits below ~-88 and turn the output into 0/0.
    m = s_w.max(axis=-1)
    p_w = jnp.exp(s_w - _finite(m)[..., None])
    carry = (_band_t(p_w, v_w), m, p_w.sum(axis=-1))

    def body(j, carry):
        acc, m, l = carry
        ids = jax.lax.dynamic_slice_in_dim(idx_top, j * sub, sub, axis=3)
        _, vb, _, s = _top_parts(qm, tc, ids, j * sub, n_top, k, v, cfg.block_size, scale)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - _finite(m_new)[..., None])
        a = jnp.exp(m - _finite(m_new))
        acc = a[..., None] * acc + jnp.einsum("bhcns,bhcsd->bhcnd", p, vb, precision=_HI)
        return acc, m_new, a * l + p.sum(axis=-1)

    acc, m, l = jax.lax.fori_loop(0, idx_top.shape[-1] // sub, body, carry)
    return _to_tokens(acc / l[..., None], b, c, hq, d), m + jnp.log(l)


def _chunk_fwd_all_blocks(qc, tc, idx, count, k, v, cfg):
    """Decode form (C = 1): gather every listed block (top-k and window alike) and do one softmax over them.

    With a single query the window is no longer shared and ~96 blocks fit in cache, so one [G, D] x [D, k_max*bs]
    product per group is simplest and fastest. Same keys, same result, same lse as _chunk_fwd.
    """
    b, c, hq, d = qc.shape
    scale = 1.0 / math.sqrt(d)
    qm = _group(qc, k.shape[2])
    _, vb, _, s = _top_parts(qm, tc, idx, 0, count, k, v, cfg.block_size, scale)
    m = s.max(axis=-1)
    p = jnp.exp(s - m[..., None])
    l = p.sum(axis=-1)
    o = jnp.einsum("bhcns,bhcsd->bhcnd", p, vb, precision=_HI) / l[..., None]
    return _to_tokens(o, b, c, hq, d), m + jnp.log(l)


def _chunk_bwd(qc, tc, idx_top, n_top, k, v, oc, doc, lse, cfg, w, sub, dk, dv):
    """Gradients of one chunk: returns dq [B,C,Hq,D] and dk, dv [B,Tk,Hkv,D] with this chunk's part added."""
    b, c, hq, d = qc.shape
    hkv = k.shape[2]
    scale = 1.0 / math.sqrt(d)
    qm, dom = _group(qc, hkv), _group(doc, hkv)
    delta = jnp.sum(dom * _group(oc, hkv), axis=-1)                                # [B,Hkv,C,G]
    k_w, v_w, start, s_w = _window_parts(qm, tc, k, v, cfg, w, scale)
    p_w = jnp.exp(s_w - lse[..., None])
    ds_w = p_w * (_band(dom, v_w) - delta[..., None]) * scale
    dq = _band_t(ds_w, k_w)
    m2 = lambda x: x.reshape(b, hkv, c * x.shape[3], -1)
    dk_w = jnp.einsum("bhmw,bhmd->bwhd", m2(ds_w), m2(qm), precision=_HI)
    dv_w = jnp.einsum("bhmw,bhmd->bwhd", m2(p_w), m2(dom), precision=_HI)

    def add_band(acc, band, st):
        cur = jax.lax.dynamic_slice_in_dim(acc, st, w, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(acc, cur + band, st, axis=0)

    dk = jax.vmap(add_band)(dk, dk_w, start)
    dv = jax.vmap(add_band)(dv, dv_w, start)

    def body(j, carry):
        dq, dk, dv = carry
        ids = jax.lax.dynamic_slice_in_dim(idx_top, j * sub, sub, axis=3)
        kb, vb, starts, s = _top_parts(qm, tc, ids, j * sub, n_top, k, v, cfg.block_size, scale)
        p = jnp.exp(s - lse[..., None])
        dp = jnp.einsum("bhcnd,bhcsd->bhcns", dom, vb, precision=_HI)
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bhcns,bhcsd->bhcnd", ds, kb, precision=_HI)
        shape = starts.shape[:-1] + (cfg.block_size, d)                           # [B,Hkv,C,sub,bs,D]
        dkb = jnp.einsum("bhcns,bhcnd->bhcsd", ds, qm, precision=_HI).reshape(shape)
        dvb = jnp.einsum("bhcns,bhcnd->bhcsd", p, dom, precision=_HI).reshape(shape)
        return dq, _scatter_add_blocks(dk, starts, dkb), _scatter_add_blocks(dv, starts, dvb)

    dq, dk, dv = jax.lax.fori_loop(0, idx_top.shape[-1] // sub, body, (dq, dk, dv))
    return _to_tokens(dq, b, c, hq, d), dk, dv


def _split(x, axis, c, nc):
    """Pad axis to nc*c (edge values) and move the chunk index to the front."""
    pad = nc * c - x.shape[axis]
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths, mode="edge")
    x = x.reshape(x.shape[:axis] + (nc, c) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _merge(x, axis, tq):
    """Inverse of _split for an output whose chunk axis was stacked at 0 and token axis sits at `axis`."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, tq, axis=axis)


def _prep(q, t, lists: BlockLists, kt, chunk, sub):
    tq = q.shape[1]
    c = min(chunk, tq)
    nc = -(-tq // c)
    idx_top = lists.idx[..., :kt]
    pad = -kt % sub  # padded slots are >= n_top, hence masked
    if pad:
        idx_top = jnp.concatenate([idx_top, jnp.broadcast_to(idx_top[..., :1], idx_top.shape[:-1] + (pad,))], -1)
    return c, nc, (_split(q, 1, c, nc), _split(t, 1, c, nc), _split(idx_top, 2, c, nc),
                   _split(lists.n_top, 2, c, nc))


def _fwd_impl(q, k, v, t, lists, cfg, chunk, kt, sub):
    tq = q.shape[1]
    if tq == 1:  # decode
        o, lse = _chunk_fwd_all_blocks(q, t, lists.idx, lists.count, k, v, cfg)
        return o, lse
    c, nc, xs = _prep(q, t, lists, kt, chunk, sub)
    w = window_width(k.shape[1], c, cfg)

    def body(_, x):
        qc, tc, it, nt = x
        return None, _chunk_fwd(qc, tc, it, nt, k, v, cfg, w, sub)

    if nc == 1:  # decode / short prefill: no loop, so XLA does not thread the whole K/V through a while op
        o, lse = jax.tree.map(lambda a: a[None], body(None, jax.tree.map(lambda a: a[0], xs))[1])
    else:
        _, (o, lse) = jax.lax.scan(body, None, xs)
    return _merge(o, 1, tq), _merge(lse, 2, tq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _sparse_attention(q, k, v, t, lists, cfg, chunk, kt, sub):
    return _fwd_impl(q, k, v, t, lists, cfg, chunk, kt, sub)[0].astype(q.dtype)


def _vjp_fwd(q, k, v, t, lists, cfg, chunk, kt, sub):
    o, lse = _fwd_impl(q, k, v, t, lists, cfg, chunk, kt, sub)
    o = o.astype(q.dtype)
    return o, (q, k, v, t, lists, o, lse)


def _vjp_bwd(cfg, chunk, kt, sub, res, do):
    q, k, v, t, lists, o, lse = res
    tq = q.shape[1]
    c, nc, xs = _prep(q, t, lists, kt, chunk, sub)
    # padded (duplicated) queries get do = 0, so they contribute nothing
    do = jnp.pad(do, ((0, 0), (0, nc * c - tq), (0, 0), (0, 0)))
    xs = xs + (_split(o, 1, c, nc), jnp.moveaxis(do.reshape(do.shape[0], nc, c, *do.shape[2:]), 1, 0),
               _split(lse, 2, c, nc))
    w = window_width(k.shape[1], c, cfg)

    def body(carry, x):
        qc, tc, it, nt, oc, doc, lc = x
        dq, dk, dv = _chunk_bwd(qc, tc, it, nt, k, v, oc, doc, lc, cfg, w, sub, *carry)
        return (dk, dv), dq

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(body, (zeros, zeros), xs)
    dq = _merge(dq, 1, tq)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_sparse_attention.defvjp(_vjp_fwd, _vjp_bwd)


def sparse_attention_xla(q, k, v, lists: BlockLists, t, cfg: SparseConfig, *, chunk: int = 8,
                         sub: int = 4) -> jax.Array:
    """Attention of q [B,Tq,Hq,D] at positions t [B,Tq] over the blocks in `lists` (see select.py).

    k, v: [B,Tk,Hkv,D]. Returns [B,Tq,Hq,D] in q.dtype (fp32 math). Differentiable w.r.t. q, k, v.
    chunk: queries per step; sub: top-k slots gathered per inner step (memory ~ chunk*sub*block*D per group).
    """
    kt = lists.idx.shape[-1] - cfg.window_blocks
    sub = max(1, min(sub, kt))
    lists = jax.tree.map(jax.lax.stop_gradient, lists)
    if k.shape[1] < cfg.block_size:  # block gathers read whole blocks; pad a tiny sequence (keys > t are masked)
        pad = ((0, 0), (0, cfg.block_size - k.shape[1]), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    return _sparse_attention(q, k, v, t, lists, cfg, chunk, kt, sub)
