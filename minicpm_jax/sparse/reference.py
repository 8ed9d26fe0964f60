"""InfLLM v2 reference: exact, simple, O(T^2) memory. The ground truth every other implementation is tested against.

A direct transcription of spec §2.2-2.3 and §2.7 for both variants (`cfg.variant`: "minicpm4", the June-2025
window outside top-k; "minicpm4.1", the local blocks forced inside a larger top-k), batched with `vmap` over rows, with
absolute query positions so the same code serves prefill (queries = last Tq keys) and decode (one query per row at
position length-1, keys beyond the row's length masked by causality). It shares no code with the chunked path
(`select.py`, `xla.py`) on purpose.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.sparse.config import SparseConfig


def _kernel_means(k, ks, st):
    """Mean of every complete kernel, as an averaging matrix [n, Tk] (row j is 1/ks on keys j*st .. j*st+ks-1)."""
    n = max((k.shape[0] - ks) // st + 1, 0)
    if n == 0:
        return jnp.zeros((0,) + k.shape[1:], jnp.float32)
    avg = np.zeros((n, k.shape[0]), np.float32)
    for j in range(n):
        avg[j, j * st: j * st + ks] = 1.0 / ks
    return jnp.einsum("js,shd->jhd", avg, k.astype(jnp.float32), precision="highest")


def _block_scores_one(q, k, t, cfg: SparseConfig):
    """Stages 0-2: q [Tq, Hq, D], k [Tk, Hkv, D], t [Tq] absolute positions -> block scores [Hkv, Tq, NB]."""
    tq, hq, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    ks, kst, bs = cfg.kernel_size, cfg.kernel_stride, cfg.block_size
    qg = q.astype(jnp.float32).reshape(tq, hkv, g, d)
    kc1 = _kernel_means(k, ks, kst)
    n1 = kc1.shape[0]
    nb = -(-tk // bs)
    if n1 == 0:
        s = jnp.zeros((hkv, tq, 0), jnp.float32)
    else:
        vis1 = (jnp.arange(n1)[None, :] * kst + ks - 1) <= t[:, None]
        l1 = jnp.einsum("tgnd,jgd->gntj", qg, kc1, precision="highest") / math.sqrt(d)
        l1 = jnp.where(vis1[None, None], l1, -jnp.inf)
        lse = jax.nn.logsumexp(l1, axis=-1, keepdims=True)
        if cfg.lse_approx:
            kc2 = _kernel_means(k, 4 * ks, 4 * kst)
            n2 = kc2.shape[0]
            if n2 > 0:
                vis2 = (jnp.arange(n2)[None, :] * 4 * kst + 4 * ks - 1) <= t[:, None]
                l2 = jnp.einsum("tgnd,jgd->gntj", qg, kc2, precision="highest") / math.sqrt(d)
                lse2 = jax.nn.logsumexp(jnp.where(vis2[None, None], l2, -jnp.inf), axis=-1, keepdims=True)
                lse = jnp.where(jnp.isfinite(lse2), lse2, lse)  # no coarse kernel visible yet: exact normaliser
        p1 = jnp.where(vis1[None, None], jnp.exp(l1 - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
        s = p1.sum(axis=1)  # [Hkv, Tq, n1]: sum over the heads of the group
    # stage 2: block b = max over kernels j whose span [j*kst, j*kst+ks) meets [b*bs, (b+1)*bs); 0 if none
    meets = np.array([[j * kst < (b + 1) * bs and j * kst + ks > b * bs for j in range(n1)] for b in range(nb)],
                     bool).reshape(nb, n1)
    return jnp.max(jnp.where(meets, s[..., None, :], 0.0), axis=-1, initial=0.0)  # [Hkv, Tq, NB]


def _select_one(q, k, t, cfg: SparseConfig):
    """Stage 3: q [Tq, Hq, D], k [Tk, Hkv, D], t [Tq] absolute positions -> bool [Hkv, Tq, NB]."""
    blk = _block_scores_one(q, k, t, cfg)
    hkv, tq, nb = blk.shape
    qb = t // cfg.block_size
    bidx = jnp.arange(nb)
    n = cfg.window_blocks
    future = bidx[None, None] > qb[None, :, None]
    if cfg.variant == "minicpm4":
        # June 2025: window qb-n+1..qb scored -inf and attended besides a top-`topk` holding the init blocks
        in_win = (bidx[None] > qb[:, None] - n) & (bidx[None] <= qb[:, None])  # [Tq, NB]
        blk = jnp.where(in_win[None], -jnp.inf, blk)
        k_top, extra = cfg.topk, in_win[None]
    else:
        # 2025-08-25 on: init blocks and the n+1 local blocks qb-n..qb forced +inf in a top-(topk+n); nothing else
        local = (bidx[None] >= qb[:, None] - n) & (bidx[None] <= qb[:, None])
        blk = jnp.where(local[None], jnp.inf, blk)
        k_top, extra = cfg.topk + n, jnp.zeros((1, tq, nb), bool)
    blk = jnp.where(bidx < cfg.init_blocks, jnp.inf, blk)
    blk = jnp.where(future, -jnp.inf, blk)
    vals, idx = jax.lax.top_k(blk, min(k_top, nb))
    picked = jnp.zeros((hkv, tq, nb), bool).at[
        jnp.arange(hkv)[:, None, None], jnp.arange(tq)[None, :, None], idx].set(vals > -jnp.inf)
    return picked | extra


def _attend_one(q, k, v, t, sel, bs):
    """Softmax attention restricted to selected blocks + token causality. sel [Hkv, Tq, NB]."""
    tq, hq, d = q.shape
    tk, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    qg = q.astype(jnp.float32).reshape(tq, hkv, g, d)
    kpos = jnp.arange(tk)
    allowed = sel[:, :, kpos // bs] & (kpos[None, None] <= t[None, :, None])  # [Hkv, Tq, Tk]
    logits = jnp.einsum("tgnd,sgd->gnts", qg, k.astype(jnp.float32), precision="highest") / math.sqrt(d)
    logits = jnp.where(allowed[:, None], logits, -jnp.inf)
    p = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("gnts,sgd->tgnd", p, v.astype(jnp.float32), precision="highest")
    return out.reshape(tq, hq, d)


def _positions(b, tq, tk, q_offset):
    if q_offset is None:
        q_offset = tk - tq
    off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32).reshape(-1), (b,))
    return off[:, None] + jnp.arange(tq, dtype=jnp.int32)[None]


@functools.partial(jax.jit, static_argnames=("cfg",))
def block_scores_reference(q, k, cfg: SparseConfig, *, q_offset=None) -> jax.Array:
    """Unforced block scores (max-pooled, group-summed kernel probabilities): [B, Hkv, Tq, NB] float32."""
    t = _positions(q.shape[0], q.shape[1], k.shape[1], q_offset)
    return jax.vmap(lambda qq, kk, tt: _block_scores_one(qq, kk, tt, cfg))(q, k, t)


@functools.partial(jax.jit, static_argnames=("cfg",))
def select_blocks_reference(q, k, cfg: SparseConfig, *, q_offset=None) -> jax.Array:
    """q [B,Tq,Hq,D], k [B,Tk,Hkv,D] (scoring tensors) -> bool [B, Hkv, Tq, ceil(Tk/block_size)]."""
    t = _positions(q.shape[0], q.shape[1], k.shape[1], q_offset)
    sel = jax.vmap(lambda qq, kk, tt: _select_one(qq, kk, tt, cfg))(q, k, t)
    return jax.lax.stop_gradient(sel)


@functools.partial(jax.jit, static_argnames=("block_size",))
def attention_with_mask_reference(q, k, v, sel, block_size: int, *, q_offset=None) -> jax.Array:
    """Attention of q over the blocks marked in sel [B,Hkv,Tq,NB] (plus token causality); fp32 math, q.dtype out."""
    t = _positions(q.shape[0], q.shape[1], k.shape[1], q_offset)
    out = jax.vmap(lambda qq, kk, vv, tt, ss: _attend_one(qq, kk, vv, tt, ss, block_size))(q, k, v, t, sel)
    return out.astype(q.dtype)


def infllm_v2_reference(q, k, v, cfg: SparseConfig, *, q_score=None, k_score=None, q_offset=None) -> jax.Array:
    """Exact InfLLM v2 attention. q [B,Tq,Hq,D] post-RoPE, k/v [B,Tk,Hkv,D] -> [B,Tq,Hq,D] in q.dtype.

    Selection uses q_score/k_score (pre-RoPE tensors when cfg.use_nope; default q/k) under stop_gradient.
    """
    qs = q if q_score is None else q_score
    ks = k if k_score is None else k_score
    sel = select_blocks_reference(qs, ks, cfg, q_offset=q_offset)
    return attention_with_mask_reference(q, k, v, sel, cfg.block_size, q_offset=q_offset)


def dense_causal_reference(q, k, v, *, q_offset=None) -> jax.Array:
    """Plain causal GQA attention (what sparse must equal when every block is attended)."""
    tk = k.shape[1]
    nb = 1
    sel = jnp.ones((q.shape[0], k.shape[2], q.shape[1], nb), bool)
    return attention_with_mask_reference(q, k, v, sel, tk, q_offset=q_offset)
