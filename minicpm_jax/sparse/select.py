"""Stages 1-3 of InfLLM v2, memory-bounded: kernel scores -> block scores -> per-(group, token) block lists.

The selection is computed for chunks of queries at a time, so the per-head score tensor is [B, Hq, chunk, kernels]
instead of [B, Hq, T, kernels]. Everything here runs under `stop_gradient`: selection is not differentiable.

Semantics (spec §2.2-2.3), for a query at absolute position t, qb = t // block_size, in the form both variants
share (`cfg.local_blocks` = n local blocks, `cfg.topk_slots` = k top-k slots; see SparseConfig):
  * kernel j is visible iff j*stride + kernel_size - 1 <= t;
  * per head, softmax of q.kc_j / sqrt(D) over visible kernels (or exp(. - LSE of the coarse kernels) with
    lse_approx), summed over the heads of the KV group;
  * block b scores the max over the visible kernels whose span meets the block (0 if none);
  * init blocks b < init_blocks (b <= qb) enter top-k with +inf (so they count toward k), the local band
    qb-n+1 .. qb and future blocks with -inf; the top k blocks with a finite-or-+inf score are kept;
  * attended set = top-k picks ∪ local band.
"minicpm4" is this form with n = window_size // block_size and k = topk. "minicpm4.1" (init and the n'+1 blocks
qb-n' .. qb forced +inf in a top-(topk + n'), n' = window_size // block_size) attends exactly the blocks of this
form with n = n' + 1 and k = topk - 1: the forced blocks are the same, and both leave topk - 1 - init_blocks slots
(fewer near the start) to the best-scored other blocks, which top-k orders the same way (the reference implements
the folded top-k directly; the tests hold the two to each other).

Block lists (what the XLA path and the kernels consume):
  idx   [B, Hkv, Tq, k_max] int32, k_max = min(k, n_blocks) + n: the top-k picks first (descending score,
        valid ones first), then the local blocks qb, qb-1, ... >= init_blocks; entries past `count` repeat qb.
  count [B, Hkv, Tq] int32: valid entries (>= 1: qb is always attended).
  n_top [B, Hkv, Tq] int32: how many of the valid entries are top-k picks (the rest is the local band).
Every listed block is distinct and <= qb; only block qb needs the token-level causal mask.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.sparse.compress import coarse_sizes, compress_keys, num_kernels
from minicpm_jax.sparse.config import SparseConfig


class BlockLists(NamedTuple):
    idx: jax.Array    # [B, Hkv, Tq, k_max] int32
    count: jax.Array  # [B, Hkv, Tq] int32
    n_top: jax.Array  # [B, Hkv, Tq] int32


def num_blocks(length: int, cfg: SparseConfig) -> int:
    return -(-length // cfg.block_size)


def k_max(n_blocks: int, cfg: SparseConfig) -> int:
    """Static length of a block list: top-k picks plus the window."""
    return min(cfg.topk_slots, n_blocks) + cfg.local_blocks


def pool_to_blocks(s: jax.Array, n_blocks: int, cfg: SparseConfig) -> jax.Array:
    """Max-pool kernel scores onto blocks: block b takes kernels j with span meeting [b*bs, (b+1)*bs).

    s: [..., n_kernels] (>= 0, invisible kernels already 0) -> [..., n_blocks]. With r = kernel/stride and
    rb = block/stride these are j in [b*rb - r + 1, (b+1)*rb - 1], i.e. a max-pool with window rb + r - 1,
    stride rb and left padding r - 1 (5/4/1 for MiniCPM4). Padding with 0 gives "0 if none".
    """
    r = cfg.kernel_size // cfg.kernel_stride
    rb = cfg.block_size // cfg.kernel_stride
    nk = s.shape[-1]
    total = n_blocks * rb + r - 1
    pad = [(0, 0)] * (s.ndim - 1) + [(r - 1, max(total - nk - (r - 1), 0))]
    sp = jnp.pad(s, pad)[..., :total]
    window = (1,) * (s.ndim - 1) + (rb + r - 1,)
    strides = (1,) * (s.ndim - 1) + (rb,)
    return jax.lax.reduce_window(sp, -jnp.inf, jax.lax.max, window, strides, "VALID")


def kernel_scores(q: jax.Array, kc: jax.Array, t: jax.Array, cfg: SparseConfig, *, kc2: Optional[jax.Array] = None,
                  kernel_count: Optional[jax.Array] = None, kernel_count2: Optional[jax.Array] = None) -> jax.Array:
    """Group-summed kernel probabilities.

    q: [B, C, Hq, D] (scoring queries), kc: [B, NK, Hkv, D] kernel means, t: [B, C] absolute query positions,
    kc2: coarse kernels for lse_approx; kernel_count(2): [B] optional cap on stored kernels (decode caches).
    Returns S [B, Hkv, C, NK] float32, 0 where a kernel is invisible.
    """
    b, c, hq, d = q.shape
    hkv = kc.shape[2]
    g = hq // hkv
    if kc.shape[1] == 0:  # shorter than one kernel: nothing to score, every block scores 0
        return jnp.zeros((b, hkv, c, 0), jnp.float32)
    scale = 1.0 / math.sqrt(d)
    # [B, Hkv, C*G, D]: batch dims lead so the logits are one batched matmul per KV group
    qm = q.reshape(b, c, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, c * g, d).astype(jnp.float32)

    def logits_and_vis(kcx, ks, st, cnt):
        nk = kcx.shape[1]
        j = jnp.arange(nk)
        vis = (j[None, None, :] * st + ks - 1) <= t[:, :, None]  # [B, C, NK]
        if cnt is not None:
            vis = vis & (j[None, None, :] < cnt[:, None, None])
        if c * g <= 64 and hkv <= 4:
            # Decode: few query rows. The kernels as they lie, viewed as [NK*Hkv, D] rows, times all C*Hq queries:
            # they are read once and contiguously (transposing them to head-major first would copy the whole
            # compressed cache every step), as the tall operand of the matmul, which XLA:CPU runs near the read
            # bandwidth. Each row meets every KV group's queries (Hkv x the FLOPs; decode waits on bytes, not
            # FLOPs); the (kernel group == query group) blocks are kept: [B, NK, Hkv, Hkv, C, G] -> diagonal.
            full = jnp.einsum("bne,bme->bnm", kcx.astype(jnp.float32).reshape(b, nk * hkv, d),
                              qm.reshape(b, hkv * c * g, d)).reshape(b, nk, hkv, hkv, c, g)
            lg = jnp.stack([full[:, :, h, h] for h in range(hkv)], axis=1)           # [B, Hkv, NK, C, G]
            lg = lg.transpose(0, 1, 3, 4, 2) * scale
        else:
            kg = kcx.astype(jnp.float32).transpose(0, 2, 1, 3)   # [B, Hkv, NK, D]
            lg = jnp.einsum("bhmd,bhjd->bhmj", qm, kg).reshape(b, hkv, c, g, nk) * scale
        return jnp.where(vis[:, None, :, None, :], lg, -jnp.inf), vis

    l1, vis1 = logits_and_vis(kc, cfg.kernel_size, cfg.kernel_stride, kernel_count)
    m = l1.max(axis=-1, keepdims=True)                               # -inf for a row with no visible kernel
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(l1 - m)                                              # one exp per logit; 0 where invisible
    if cfg.lse_approx and kc2 is not None and kc2.shape[1] > 0:
        ks2, st2 = coarse_sizes(cfg)
        l2, _ = logits_and_vis(kc2, ks2, st2, kernel_count2)
        lse2 = jax.nn.logsumexp(l2, axis=-1, keepdims=True)
        # exp(l1 - lse2) = e * exp(m - lse2); no coarse kernel visible yet (t < 4*kernel_size - 1): exact softmax
        factor = jnp.where(jnp.isfinite(lse2), jnp.exp(m - lse2), 1.0 / jnp.maximum(e.sum(-1, keepdims=True), 1e-30))
    else:
        factor = 1.0 / jnp.maximum(e.sum(axis=-1, keepdims=True), 1e-30)
    # sum over the query heads of each KV group -> [B, Hkv, C, NK], as a batched matvec: on XLA:CPU an elementwise
    # product followed by a reduction is two more passes over the [.., G, NK] tensor
    return jnp.einsum("bhcgj,bhcg->bhcj", e, factor[..., 0])


def lists_from_block_scores(blk: jax.Array, t: jax.Array, cfg: SparseConfig,
                            n_blocks: Optional[int] = None) -> BlockLists:
    """Top-k with forced init (+inf) / local-band and future (-inf) blocks, then append the local band.

    blk: [B, Hkv, C, NB] block scores, t: [B, C] positions -> BlockLists for these C queries.
    n_blocks: blocks of the whole sequence when blk holds only the first NB of them (the rest are future blocks
    of every query here; the list length k_max still follows n_blocks). NB must be >= min(topk, n_blocks).
    """
    nb = blk.shape[-1] if n_blocks is None else n_blocks
    n = cfg.local_blocks
    qb = (t // cfg.block_size)[:, None, :, None]  # [B, 1, C, 1]
    bidx = jnp.arange(blk.shape[-1])
    in_win = (bidx > qb - n) & (bidx <= qb)
    s = jnp.where(in_win, -jnp.inf, blk)
    s = jnp.where(bidx < cfg.init_blocks, jnp.inf, s)  # init wins over the window mask
    s = jnp.where(bidx > qb, -jnp.inf, s)              # never a future block
    kt = min(cfg.topk_slots, nb)
    vals, picks = jax.lax.top_k(s, kt)  # descending: valid (> -inf) picks first; columns not in blk are future blocks
    cp = jnp.sum(vals > -jnp.inf, axis=-1).astype(jnp.int32)
    win = qb - jnp.arange(n)                            # qb, qb-1, ...: valid ones (>= init_blocks, >= 0) first
    wvalid = (win >= cfg.init_blocks) & (win >= 0)
    cw = jnp.sum(wvalid, axis=-1).astype(jnp.int32)
    win = jnp.broadcast_to(win, blk.shape[:-1] + (n,))
    slot = jnp.arange(kt + n)
    pk = jnp.concatenate([picks, jnp.zeros(picks.shape[:-1] + (n,), picks.dtype)], -1)           # [.., kt+n]
    wi = jnp.clip(slot - cp[..., None], 0, n - 1)
    wk = jnp.take_along_axis(win, wi, axis=-1)
    cpx = cp[..., None]
    count = cp + cw
    idx = jnp.where(slot < cpx, pk, jnp.where(slot < count[..., None], wk, qb))
    return BlockLists(idx.astype(jnp.int32), count, cp)


def _scores_for_chunk(qc, tc, kc, kc2, cfg, nb, kernel_count=None, kernel_count2=None):
    s = kernel_scores(qc, kc, tc, cfg, kc2=kc2, kernel_count=kernel_count, kernel_count2=kernel_count2)
    return pool_to_blocks(s, nb, cfg)


def compressed_keys(k: jax.Array, cfg: SparseConfig):
    """(kc, kc2) for full-sequence keys k [B, Tk, Hkv, D]; kc2 is None unless lse_approx."""
    kc = compress_keys(k, cfg.kernel_size, cfg.kernel_stride)
    kc2 = None
    if cfg.lse_approx:
        kc2 = compress_keys(k, *coarse_sizes(cfg))
    return kc, kc2


def query_positions(b: int, tq: int, tk: int, q_offset) -> jax.Array:
    """[B, Tq] int32 absolute positions; q_offset None (= Tk - Tq), an int, or [B]."""
    if q_offset is None:
        q_offset = tk - tq
    off = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32).reshape(-1, 1), (b, 1))
    return off + jnp.arange(tq, dtype=jnp.int32)[None, :]


def _chunked(fn, q, t, chunk):
    """Apply fn(q_chunk [B,C,H,D], t_chunk [B,C]) over query chunks with lax.map; outputs have Tq at axis 2."""
    b, tq = t.shape
    c = min(chunk, tq)
    nc = -(-tq // c)
    pad = nc * c - tq
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        t = jnp.pad(t, ((0, 0), (0, pad)), mode="edge")  # padded queries duplicate the last one; dropped below
    qs = q.reshape(b, nc, c, *q.shape[2:]).swapaxes(0, 1)
    ts = t.reshape(b, nc, c).swapaxes(0, 1)
    if nc == 1:  # decode: no loop (a while op would carry the closed-over kernels)
        outs = jax.tree.map(lambda a: a[None], fn(qs[0], ts[0]))
    else:
        outs = jax.lax.map(lambda a: fn(a[0], a[1]), (qs, ts))

    def unchunk(o):  # [nc, B, Hkv, C, ...] -> [B, Hkv, Tq, ...]
        o = jnp.moveaxis(o, 0, 2)
        o = o.reshape(o.shape[0], o.shape[1], nc * c, *o.shape[4:])
        return o[:, :, :tq]

    return jax.tree.map(unchunk, outs)


def select_block_lists(q: jax.Array, k: jax.Array, cfg: SparseConfig, *, q_offset=None, chunk: int = 256,
                       kc=None, kc2=None, kernel_count=None, kernel_count2=None,
                       n_blocks: Optional[int] = None, stages: int = 16) -> BlockLists:
    """Block lists for queries q [B, Tq, Hq, D] against keys k [B, Tk, Hkv, D] (the scoring tensors).

    Pass kc/kc2 (+ kernel_count) to score against an existing compressed cache (decode); k then only sets Tk.
    """
    b, tq = q.shape[:2]
    tk = k.shape[1]
    nb = num_blocks(tk, cfg) if n_blocks is None else n_blocks
    if kc is None:
        kc, kc2 = compressed_keys(k, cfg)
    t = query_positions(b, tq, tk, q_offset)
    q = jax.lax.stop_gradient(q)
    kc = jax.lax.stop_gradient(kc)

    def fn(qc, tc):
        blk = _scores_for_chunk(qc, tc, kc, kc2, cfg, nb, kernel_count, kernel_count2)
        return lists_from_block_scores(blk, tc, cfg)

    if (q_offset is None or isinstance(q_offset, int)) and kernel_count is None and kernel_count2 is None \
            and tq > chunk:
        return _select_staged(q, kc, kc2, tk - tq if q_offset is None else q_offset, cfg, nb, chunk, stages)
    out = _chunked(fn, q, t, chunk)
    return BlockLists(*out)


def _select_staged(q, kc, kc2, off: int, cfg: SparseConfig, nb: int, chunk: int, stages: int) -> BlockLists:
    """Causal block selection for queries at the static positions off .. off+Tq-1.

    Query chunks are grouped into `stages` runs of consecutive chunks; a run scores only the kernels (and top-k
    only the blocks) its last query can see, so the causally invisible half of the score matrix is mostly
    skipped. Same result as scoring every kernel: the skipped kernels are invisible, hence score 0 and sit in
    future blocks, for every query of the run.
    """
    b, tq = q.shape[:2]
    c = chunk
    nc = -(-tq // c)
    ks, st = cfg.kernel_size, cfg.kernel_stride
    ks2, st2 = coarse_sizes(cfg)
    kt = min(cfg.topk_slots, nb)
    edges = sorted({round(i * nc / stages) for i in range(stages + 1)})
    outs = []
    for a, e in zip(edges[:-1], edges[1:]):
        lo, hi = a * c, min(e * c, tq)
        t_last = off + hi - 1
        w = min(kc.shape[1], num_kernels(t_last + 1, ks, st))
        kc_s = kc[:, :w]
        kc2_s = None if kc2 is None else kc2[:, :min(kc2.shape[1], num_kernels(t_last + 1, ks2, st2))]
        nbv = min(nb, max(t_last // cfg.block_size + 1, kt))

        def fn(qc, tc, kc_s=kc_s, kc2_s=kc2_s, nbv=nbv):
            blk = _scores_for_chunk(qc, tc, kc_s, kc2_s, cfg, nbv)
            return lists_from_block_scores(blk, tc, cfg, n_blocks=nb)

        tpos = off + jnp.arange(lo, hi, dtype=jnp.int32)
        outs.append(_chunked(fn, q[:, lo:hi], jnp.broadcast_to(tpos, (b, hi - lo)), c))
    return BlockLists(*(jnp.concatenate(x, axis=2) for x in zip(*outs)))


def attended_pairs(lists: BlockLists, block_size: int) -> int:
    """(query, key) pairs the lists attend, summed over rows and KV groups, for queries at positions 0 .. Tq-1
    (FLOP accounting in the benchmarks; counts a partial own block only up to the query)."""
    idx, cnt = np.asarray(lists.idx, np.int64), np.asarray(lists.count)
    pos = np.arange(idx.shape[2])[None, None, :, None]
    ok = np.arange(idx.shape[-1]) < cnt[..., None]
    return int((np.clip(pos - idx * block_size + 1, 0, block_size) * ok).sum())


def lists_to_mask(lists: BlockLists, n_blocks: int) -> jax.Array:
    """BlockLists -> bool [B, Hkv, Tq, n_blocks]."""
    slot_ok = jnp.arange(lists.idx.shape[-1]) < lists.count[..., None]
    hit = (lists.idx[..., None] == jnp.arange(n_blocks)) & slot_ok[..., None]
    return hit.any(axis=-2)


def select_blocks_xla(q, k, cfg: SparseConfig, *, q_offset=None, chunk: int = 256) -> jax.Array:
    """Chunked, memory-bounded `select_blocks`: bool [B, Hkv, Tq, n_blocks]."""
    nb = num_blocks(k.shape[1], cfg)
    lists = select_block_lists(q, k, cfg, q_offset=q_offset, chunk=chunk)
    return lists_to_mask(lists, nb)


def validate_shapes(q, k, v=None):
    """Raise ValueError for shapes the sparse path cannot take."""
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"expected q [B,Tq,Hq,D] and k [B,Tk,Hkv,D], got {q.shape} and {k.shape}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v {v.shape} must match k {k.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"batch/head_dim mismatch: q {q.shape}, k {k.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of KV heads ({k.shape[2]})")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"more queries ({q.shape[1]}) than keys ({k.shape[1]}): queries are the last Tq keys")


__all__ = ["BlockLists", "num_blocks", "k_max", "pool_to_blocks", "kernel_scores", "lists_from_block_scores",
           "select_block_lists", "lists_to_mask", "select_blocks_xla", "compressed_keys", "query_positions",
           "num_kernels", "validate_shapes"]
