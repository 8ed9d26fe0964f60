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

_HI = None  # default precision: fp32 on CPU; see note in module docstring


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


def _masks(t, pos_top, blk_top, slot_ok, pos_w, cfg: SparseConfig):
    """Visibility of gathered top-k keys [B,Hkv,C,kt,bs] and of band keys [B,C,W] for queries t [B,C]."""
    bs, n = cfg.block_size, cfg.window_blocks
    m_top = slot_ok[..., None] & (pos_top >= (blk_top * bs)[..., None]) & (pos_top <= t[:, None, :, None, None])
    qb = (t // bs)[:, :, None]
    kb = (pos_w // bs)[:, None, :]
    m_w = (kb > qb - n) & (kb <= qb) & (kb >= cfg.init_blocks) & (pos_w[:, None, :] <= t[:, :, None])
    return m_top, m_w


# Layouts inside a chunk (batch dims lead in every operand, so each einsum is a plain batched matmul on XLA:CPU;
# a 5-D einsum whose batch dims sit in different places falls back to a slow loop emitter):
#   qm   [B, Hkv, C, G, D]        queries of the chunk, grouped
#   kt_  [B, Hkv, C, kt*bs, D]    gathered top-k keys, per token
#   kw   [B, Hkv, W, D]           window band, shared by the chunk (matmul rows are C*G)
def _chunk_parts(qc, tc, idx_top, n_top, k, v, cfg, w):
    b, c, hq, d = qc.shape
    hkv = k.shape[2]
    g = hq // hkv
    kt = idx_top.shape[-1]
    bs = cfg.block_size
    qm = qc.reshape(b, c, hkv, g, d).transpose(0, 2, 1, 3, 4).astype(jnp.float32)
    k_top, pos_top, tok = _gather_top(k, idx_top, bs)
    v_top = _gather_top(v, idx_top, bs)[0]
    k_top = k_top.reshape(b, hkv, c, kt * bs, d).astype(jnp.float32)
    v_top = v_top.reshape(b, hkv, c, kt * bs, d).astype(jnp.float32)
    k_w, pos_w = _window(k, tc, cfg, w)
    v_w, _ = _window(v, tc, cfg, w)
    k_w = k_w.transpose(0, 2, 1, 3).astype(jnp.float32)
    v_w = v_w.transpose(0, 2, 1, 3).astype(jnp.float32)
    slot_ok = jnp.arange(kt) < n_top[..., None]
    m_top, m_w = _masks(tc, pos_top, idx_top, slot_ok, pos_w, cfg)
    m_top = m_top.reshape(b, hkv, c, 1, kt * bs)
    m_w = m_w[:, None, :, None, :]                                                 # [B,1,C,1,W]
    return qm, k_top, v_top, tok, k_w, v_w, m_top, m_w


def _band(x, kw):
    """[B,Hkv,C,G,D] x [B,Hkv,W,D] -> [B,Hkv,C,G,W] as one matmul with C*G rows per group."""
    b, h, c, g, d = x.shape
    return jnp.einsum("bhmd,bhwd->bhmw", x.reshape(b, h, c * g, d), kw, precision=_HI).reshape(b, h, c, g, -1)


def _band_t(p, vw):
    """[B,Hkv,C,G,W] x [B,Hkv,W,D] -> [B,Hkv,C,G,D]."""
    b, h, c, g, w = p.shape
    return jnp.einsum("bhmw,bhwd->bhmd", p.reshape(b, h, c * g, w), vw, precision=_HI).reshape(b, h, c, g, -1)


def _logits(qm, k_top, k_w, m_top, m_w, scale):
    s_top = jnp.einsum("bhcnd,bhcsd->bhcns", qm, k_top, precision=_HI) * scale
    s_w = _band(qm, k_w) * scale
    return jnp.where(m_top, s_top, -jnp.inf), jnp.where(m_w, s_w, -jnp.inf)


def _to_tokens(x, b, c, hq, d):
    """[B,Hkv,C,G,D] -> [B,C,Hq,D]."""
    return x.transpose(0, 2, 1, 3, 4).reshape(b, c, hq, d)


def _chunk_fwd(qc, tc, idx_top, n_top, k, v, cfg, w):
    """One chunk: qc [B,C,Hq,D] -> out [B,C,Hq,D] f32 and lse [B,Hkv,C,G]."""
    b, c, hq, d = qc.shape
    scale = 1.0 / math.sqrt(d)
    qm, k_top, v_top, _, k_w, v_w, m_top, m_w = _chunk_parts(qc, tc, idx_top, n_top, k, v, cfg, w)
    s_top, s_w = _logits(qm, k_top, k_w, m_top, m_w, scale)
    m = jnp.maximum(s_top.max(axis=-1), s_w.max(axis=-1))  # finite: the query's own key is always visible
    p_top = jnp.exp(s_top - m[..., None])
    p_w = jnp.exp(s_w - m[..., None])
    l = p_top.sum(axis=-1) + p_w.sum(axis=-1)
    o = jnp.einsum("bhcns,bhcsd->bhcnd", p_top, v_top, precision=_HI) + _band_t(p_w, v_w)
    o = o / l[..., None]
    return _to_tokens(o, b, c, hq, d), m + jnp.log(l)


def _chunk_fwd_all_blocks(qc, tc, idx, count, k, v, cfg):
    """Decode form (C = 1): gather every listed block (top-k and window alike) and do one softmax over them.

    With a single query the window is no longer shared, so one [G, D] x [D, k_max*bs] product per group is
    simplest. Same keys, same result, same lse as _chunk_fwd.
    """
    b, c, hq, d = qc.shape
    hkv = k.shape[2]
    g = hq // hkv
    kk = idx.shape[-1]
    bs = cfg.block_size
    scale = 1.0 / math.sqrt(d)
    qm = qc.reshape(b, c, hkv, g, d).transpose(0, 2, 1, 3, 4).astype(jnp.float32)
    kb, pos, _ = _gather_top(k, idx, bs)                                          # [B,Hkv,C,K,bs,D]
    vb = _gather_top(v, idx, bs)[0]
    kb = kb.reshape(b, hkv, c, kk * bs, d).astype(jnp.float32)
    vb = vb.reshape(b, hkv, c, kk * bs, d).astype(jnp.float32)
    ok = (jnp.arange(kk) < count[..., None])[..., None] & (pos >= (idx * bs)[..., None]) & \
        (pos <= tc[:, None, :, None, None])
    ok = ok.reshape(b, hkv, c, 1, kk * bs)
    s = jnp.einsum("bhcnd,bhcsd->bhcns", qm, kb, precision=_HI) * scale
    s = jnp.where(ok, s, -jnp.inf)
    m = s.max(axis=-1)
    p = jnp.exp(s - m[..., None])
    l = p.sum(axis=-1)
    o = jnp.einsum("bhcns,bhcsd->bhcnd", p, vb, precision=_HI) / l[..., None]
    return _to_tokens(o, b, c, hq, d), m + jnp.log(l)


def _chunk_bwd(qc, tc, idx_top, n_top, k, v, oc, doc, lse, cfg, w):
    """Gradients of one chunk: dq [B,C,Hq,D] and the dk/dv contributions (top: per gathered key, band: [B,W,..])."""
    b, c, hq, d = qc.shape
    hkv = k.shape[2]
    g = hq // hkv
    kt = idx_top.shape[-1]
    bs = cfg.block_size
    scale = 1.0 / math.sqrt(d)
    qm, k_top, v_top, tok, k_w, v_w, m_top, m_w = _chunk_parts(qc, tc, idx_top, n_top, k, v, cfg, w)
    s_top, s_w = _logits(qm, k_top, k_w, m_top, m_w, scale)
    dom = doc.reshape(b, c, hkv, g, d).transpose(0, 2, 1, 3, 4).astype(jnp.float32)
    om = oc.reshape(b, c, hkv, g, d).transpose(0, 2, 1, 3, 4).astype(jnp.float32)
    delta = jnp.sum(dom * om, axis=-1)                                             # [B,Hkv,C,G]
    p_top = jnp.exp(s_top - lse[..., None])
    p_w = jnp.exp(s_w - lse[..., None])
    dp_top = jnp.einsum("bhcnd,bhcsd->bhcns", dom, v_top, precision=_HI)
    dp_w = _band(dom, v_w)
    ds_top = p_top * (dp_top - delta[..., None]) * scale
    ds_w = p_w * (dp_w - delta[..., None]) * scale
    dq = jnp.einsum("bhcns,bhcsd->bhcnd", ds_top, k_top, precision=_HI) + _band_t(ds_w, k_w)
    dk_top = jnp.einsum("bhcns,bhcnd->bhcsd", ds_top, qm, precision=_HI).reshape(b, hkv, c, kt, bs, d)
    dv_top = jnp.einsum("bhcns,bhcnd->bhcsd", p_top, dom, precision=_HI).reshape(b, hkv, c, kt, bs, d)
    m2 = lambda x: x.reshape(b, hkv, c * g, -1)
    dk_w = jnp.einsum("bhmw,bhmd->bwhd", m2(ds_w), m2(qm), precision=_HI)
    dv_w = jnp.einsum("bhmw,bhmd->bwhd", m2(p_w), m2(dom), precision=_HI)
    return _to_tokens(dq, b, c, hq, d), tok, dk_top, dv_top, dk_w, dv_w


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
    if tq == 1:  # decode
        o, lse = _chunk_fwd_all_blocks(q, t, lists.idx, lists.count, k, v, cfg)
        return o, lse
    c, nc, xs = _prep(q, t, lists, kt, chunk)
    w = window_width(k.shape[1], c, cfg)

    def body(_, x):
        qc, tc, it, nt = x
        return None, _chunk_fwd(qc, tc, it, nt, k, v, cfg, w)

    if nc == 1:  # decode / short prefill: no loop, so XLA does not thread the whole K/V through a while op
        o, lse = jax.tree.map(lambda a: a[None], body(None, jax.tree.map(lambda a: a[0], xs))[1])
    else:
        _, (o, lse) = jax.lax.scan(body, None, xs)
    return _merge(o, 1, tq), _merge(lse, 2, tq)


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
               _split(lse, 2, c, nc))
    w = window_width(k.shape[1], c, cfg)
    b, _, hkv, _ = k.shape
    bi = jnp.arange(b)[:, None, None, None, None]
    gi = jnp.arange(hkv)[None, :, None, None, None]

    def body(carry, x):
        dk, dv = carry
        qc, tc, it, nt, oc, doc, lc = x
        dq, tok, dk_top, dv_top, dk_w, dv_w = _chunk_bwd(qc, tc, it, nt, k, v, oc, doc, lc, cfg, w)
        dk = _scatter_add_blocks(dk, tok, dk_top)   # tok: the block starts of the gather
        dv = _scatter_add_blocks(dv, tok, dv_top)
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
    """Forward only, also returning lse [B,Hkv,Tq,G]."""
    kt = lists.idx.shape[-1] - cfg.window_blocks
    o, lse = _fwd_impl(q, k, v, t, lists, cfg, chunk, kt)
    return o.astype(q.dtype), lse
