"""InfLLM v2 stage 4 in plain XLA: memory-bounded, differentiable (custom_vjp), runs anywhere.

Queries are processed in chunks of C tokens (lax.scan). Each chunk attends two disjoint key sets whose softmax is
merged exactly:
  * the top-k picks (init blocks included): gathered per (KV group, token), [C, topk, block, D] per group;
    blocks strictly before the window are fully visible, only an init block that is the query's own block needs
    the causal mask;
  * the local window: the same contiguous band of keys for every token of the chunk (blocks qb-n+1 .. qb), so it
    is a dynamic_slice, not a gather, and one [C*G, D] x [D, band] matmul per group.
Nothing is padded: block gathers clamp to the sequence and every key is masked by its absolute position, so a
block list may point at a partial last block. Gradients: the backward pass recomputes the probabilities per chunk
from the saved log-sum-exp (flash-attention style) and scatter-adds dk/dv, so residuals are O(T), not O(T*6K).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from minicpm_jax.sparse.config import SparseConfig
from minicpm_jax.sparse.select import BlockLists

_HI = "highest"  # fp32 matmuls on CPU/GPU; the kernels are where low precision belongs


def window_width(tk: int, chunk: int, cfg: SparseConfig) -> int:
    """Keys in the contiguous band covering the windows of `chunk` consecutive queries (clamped to Tk)."""
    bs = cfg.block_size
    return min(tk, (cfg.window_blocks - 1 + (chunk - 1) // bs + 2) * bs)


def _gather_top(k, idx_top, bs):
    """k [B,Tk,Hkv,D], idx_top [B,Hkv,C,kt] -> blocks [B,Hkv,C,kt,bs,D], token positions [B,Hkv,C,kt,bs]."""
    b, tk, hkv, _ = k.shape
    pos = idx_top[..., None] * bs + jnp.arange(bs, dtype=jnp.int32)
    tok = jnp.minimum(pos, tk - 1)
    bi = jnp.arange(b)[:, None, None, None, None]
    gi = jnp.arange(hkv)[None, :, None, None, None]
    return k[bi, tok, gi], pos, tok


def _window(k, t, cfg: SparseConfig, w: int):
    """Band of keys [B,W,Hkv,D] holding every window key of the chunk's queries t [B,C], and its positions [B,W]."""
    tk = k.shape[1]
    bs, n = cfg.block_size, cfg.window_blocks
    s0 = (t[:, 0] // bs - n + 1) * bs
    start = jnp.clip(s0, 0, tk - w)
    band = jax.vmap(lambda kk, st: jax.lax.dynamic_slice_in_dim(kk, st, w, axis=0))(k, start)
    return band, start[:, None] + jnp.arange(w, dtype=jnp.int32)[None]


def _masks(t, pos_top, slot_ok, pos_w, cfg: SparseConfig):
    """Visibility of gathered top-k keys [B,Hkv,C,kt,bs] and of band keys [B,C,W] for queries t [B,C]."""
    bs, n = cfg.block_size, cfg.window_blocks
    m_top = slot_ok[..., None] & (pos_top <= t[:, None, :, None, None])
    qb = (t // bs)[:, :, None]
    kb = (pos_w // bs)[:, None, :]
    m_w = (kb > qb - n) & (kb <= qb) & (kb >= cfg.init_blocks) & (pos_w[:, None, :] <= t[:, :, None])
    return m_top, m_w


def _chunk_parts(qc, tc, idx_top, n_top, k, v, cfg, w):
    b, c, hq, d = qc.shape
    hkv = k.shape[2]
    g = hq // hkv
    kt = idx_top.shape[-1]
    qg = qc.reshape(b, c, hkv, g, d).astype(jnp.float32)
    k_top, pos_top, tok = _gather_top(k, idx_top, cfg.block_size)
    v_top = _gather_top(v, idx_top, cfg.block_size)[0]
    k_w, pos_w = _window(k, tc, cfg, w)
    v_w, _ = _window(v, tc, cfg, w)
    slot_ok = jnp.arange(kt) < n_top[..., None]
    m_top, m_w = _masks(tc, pos_top, slot_ok, pos_w, cfg)
    return qg, k_top.astype(jnp.float32), v_top.astype(jnp.float32), tok, k_w.astype(jnp.float32), \
        v_w.astype(jnp.float32), m_top, m_w


def _logits(qg, k_top, k_w, m_top, m_w, scale):
    s_top = jnp.einsum("bcgnd,bgcksd->bgncks", qg, k_top, precision=_HI) * scale
    s_w = jnp.einsum("bcgnd,bwgd->bgncw", qg, k_w, precision=_HI) * scale
    s_top = jnp.where(m_top[:, :, None], s_top, -jnp.inf)
    s_w = jnp.where(m_w[:, None, None], s_w, -jnp.inf)
    return s_top, s_w


def _chunk_fwd(qc, tc, idx_top, n_top, k, v, cfg, w):
    """One chunk: qc [B,C,Hq,D] -> out [B,C,Hq,D] f32 and lse [B,Hkv,G,C]."""
    b, c, hq, d = qc.shape
    scale = 1.0 / math.sqrt(d)
    qg, k_top, v_top, _, k_w, v_w, m_top, m_w = _chunk_parts(qc, tc, idx_top, n_top, k, v, cfg, w)
    s_top, s_w = _logits(qg, k_top, k_w, m_top, m_w, scale)
    m = jnp.maximum(s_top.max(axis=(-2, -1)), s_w.max(axis=-1))  # finite: the query's own key is always visible
    p_top = jnp.exp(s_top - m[..., None, None])
    p_w = jnp.exp(s_w - m[..., None])
    l = p_top.sum(axis=(-2, -1)) + p_w.sum(axis=-1)
    o = jnp.einsum("bgncks,bgcksd->bgncd", p_top, v_top, precision=_HI) + \
        jnp.einsum("bgncw,bwgd->bgncd", p_w, v_w, precision=_HI)
    o = o / l[..., None]
    out = jnp.moveaxis(o, 3, 1).reshape(b, c, hq, d)  # [B,Hkv,G,C,D] -> [B,C,Hkv,G,D]
    return out, m + jnp.log(l)


def _chunk_bwd(qc, tc, idx_top, n_top, k, v, oc, doc, lse, cfg, w):
    """Gradients of one chunk: dq [B,C,Hq,D] and the dk/dv contributions (top: per gathered key, band: [B,W,..])."""
    b, c, hq, d = qc.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d)
    qg, k_top, v_top, tok, k_w, v_w, m_top, m_w = _chunk_parts(qc, tc, idx_top, n_top, k, v, cfg, w)
    s_top, s_w = _logits(qg, k_top, k_w, m_top, m_w, scale)
    dog = doc.reshape(b, c, hkv, g, d).astype(jnp.float32)
    delta = jnp.einsum("bcgnd,bcgnd->bgnc", dog, oc.reshape(b, c, hkv, g, d).astype(jnp.float32), precision=_HI)
    p_top = jnp.exp(s_top - lse[..., None, None])
    p_w = jnp.exp(s_w - lse[..., None])
    dp_top = jnp.einsum("bcgnd,bgcksd->bgncks", dog, v_top, precision=_HI)
    dp_w = jnp.einsum("bcgnd,bwgd->bgncw", dog, v_w, precision=_HI)
    ds_top = p_top * (dp_top - delta[..., None, None]) * scale
    ds_w = p_w * (dp_w - delta[..., None]) * scale
    dq = jnp.einsum("bgncks,bgcksd->bcgnd", ds_top, k_top, precision=_HI) + \
        jnp.einsum("bgncw,bwgd->bcgnd", ds_w, k_w, precision=_HI)
    dk_top = jnp.einsum("bgncks,bcgnd->bgcksd", ds_top, qg, precision=_HI)
    dv_top = jnp.einsum("bgncks,bcgnd->bgcksd", p_top, dog, precision=_HI)
    dk_w = jnp.einsum("bgncw,bcgnd->bwgd", ds_w, qg, precision=_HI)
    dv_w = jnp.einsum("bgncw,bcgnd->bwgd", p_w, dog, precision=_HI)
    return dq.reshape(b, c, hq, d), tok, dk_top, dv_top, dk_w, dv_w


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


def _prep(q, t, lists: BlockLists, kt, chunk):
    tq = q.shape[1]
    c = min(chunk, tq)
    nc = -(-tq // c)
    return c, nc, (_split(q, 1, c, nc), _split(t, 1, c, nc), _split(lists.idx[..., :kt], 2, c, nc),
                   _split(lists.n_top, 2, c, nc))


def _fwd_impl(q, k, v, t, lists, cfg, chunk, kt):
    tq = q.shape[1]
    c, nc, xs = _prep(q, t, lists, kt, chunk)
    w = window_width(k.shape[1], c, cfg)

    def body(_, x):
        qc, tc, it, nt = x
        return None, _chunk_fwd(qc, tc, it, nt, k, v, cfg, w)

    _, (o, lse) = jax.lax.scan(body, None, xs)
    return _merge(o, 1, tq), _merge(lse, 3, tq)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _sparse_attention(q, k, v, t, lists, cfg, chunk, kt):
    return _fwd_impl(q, k, v, t, lists, cfg, chunk, kt)[0].astype(q.dtype)


def _vjp_fwd(q, k, v, t, lists, cfg, chunk, kt):
    o, lse = _fwd_impl(q, k, v, t, lists, cfg, chunk, kt)
    o = o.astype(q.dtype)
    return o, (q, k, v, t, lists, o, lse)


def _vjp_bwd(cfg, chunk, kt, res, do):
    q, k, v, t, lists, o, lse = res
    tq = q.shape[1]
    c, nc, xs = _prep(q, t, lists, kt, chunk)
    # padded (duplicated) queries get do = 0, so they contribute nothing
    do = jnp.pad(do, ((0, 0), (0, nc * c - tq), (0, 0), (0, 0)))
    xs = xs + (_split(o, 1, c, nc), jnp.moveaxis(do.reshape(do.shape[0], nc, c, *do.shape[2:]), 1, 0),
               _split(lse, 3, c, nc))
    w = window_width(k.shape[1], c, cfg)
    b, _, hkv, _ = k.shape
    bi = jnp.arange(b)[:, None, None, None, None]
    gi = jnp.arange(hkv)[None, :, None, None, None]

    def body(carry, x):
        dk, dv = carry
        qc, tc, it, nt, oc, doc, lc = x
        dq, tok, dk_top, dv_top, dk_w, dv_w = _chunk_bwd(qc, tc, it, nt, k, v, oc, doc, lc, cfg, w)
        dk = dk.at[bi, tok, gi].add(dk_top)
        dv = dv.at[bi, tok, gi].add(dv_top)
        start = jnp.clip((tc[:, 0] // cfg.block_size - cfg.window_blocks + 1) * cfg.block_size, 0, k.shape[1] - w)

        def add_band(acc, band, st):
            cur = jax.lax.dynamic_slice_in_dim(acc, st, w, axis=0)
            return jax.lax.dynamic_update_slice_in_dim(acc, cur + band, st, axis=0)

        dk = jax.vmap(add_band)(dk, dk_w, start)
        dv = jax.vmap(add_band)(dv, dv_w, start)
        return (dk, dv), dq

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(body, (zeros, zeros), xs)
    dq = _merge(dq, 1, tq)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_sparse_attention.defvjp(_vjp_fwd, _vjp_bwd)


def sparse_attention_xla(q, k, v, lists: BlockLists, t, cfg: SparseConfig, *, chunk: int = 32) -> jax.Array:
    """Attention of q [B,Tq,Hq,D] at positions t [B,Tq] over the blocks in `lists` (see select.py).

    k, v: [B,Tk,Hkv,D]. Returns [B,Tq,Hq,D] in q.dtype (fp32 math). Differentiable w.r.t. q, k, v.
    """
    kt = lists.idx.shape[-1] - cfg.window_blocks
    lists = jax.tree.map(jax.lax.stop_gradient, lists)
    return _sparse_attention(q, k, v, t, lists, cfg, chunk, kt)


def sparse_attention_xla_with_lse(q, k, v, lists: BlockLists, t, cfg: SparseConfig, *, chunk: int = 32):
    """Forward only, also returning lse [B,Hkv,G,Tq] (used by tests and by the decode path)."""
    kt = lists.idx.shape[-1] - cfg.window_blocks
    o, lse = _fwd_impl(q, k, v, t, lists, cfg, chunk, kt)
    return o.astype(q.dtype), lse
