"""InfLLM v2 stage 4 in plain XLA: memory-bounded, differentiable (custom_vjp), runs anywhere.

Every query attends two disjoint key sets, computed separately and merged exactly:
  * the shared part, the init blocks (b < init_blocks) and the local window (blocks qb-n+1 .. qb, >= init_blocks):
    the same keys for all queries of a chunk (a dynamic slice, no gather), so a chunk of C queries is one dense
    [C*G, D] x [D, init + band] masked matmul per KV group, with the token causal mask;
  * the top-k picks beyond the init blocks: they lie strictly before the window, so no causal mask. They are
    processed key-block major ("transposed"): the (query, block) pairs are sorted by block once, cut into tiles
    of `tile` pairs that share one key block, and each tile gathers its queries ([tile*G, D], G heads of a token
    at a time), multiplies them with the block's keys and values as they lie, and scatter-adds the results back
    to its queries. Gathering queries (G*D floats per pair) instead of key/value blocks (2*block*D floats per
    pair) is 8x less data at MiniCPM4 sizes, and the matmuls have tile*G rows instead of G.
Softmax merging: the shared part always holds the query's own key, so its row max c is finite; the top-k tiles
accumulate exp(s - c) with that fixed shift (no per-pair rescaling, so scatter-adds just add). If a sum comes out
non-finite (a top-k logit ~88 above c), a logits-only pass finds the largest top-k logit and the top-k pass is
redone with the shift raised to it (_topk_fwd). Terms far below the shift underflow only where they are < e^-87 of the
row's largest term, i.e. below fp32 resolution. The result is exact either way.
Gradients: the backward pass recomputes probabilities from the saved log-sum-exp (flash-attention style): the
shared part per query chunk (dk/dv added to the band), the top-k part per tile (dq scatter-added, dk/dv of the
tile's block accumulated in place). Residuals are O(T): inputs, output, lse and the tile schedule.
Decode (one query) gathers every listed block at once instead (_chunk_fwd_all_blocks).
Matmuls use the default precision: exact fp32 on CPU; on GPU XLA may use TF32 for fp32 inputs (the Pallas
kernels are the GPU path).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from minicpm_jax.sparse.config import SparseConfig
from minicpm_jax.sparse.select import BlockLists, num_blocks

# ------------------------------------------------------------------------------------------------ decode (Tq == 1)
def _block_dnums():
    # operand [B, Tk, Hkv, D]; index vectors (b, start, g) -> one [bs, D] slice per (b, group, query, slot)
    return jax.lax.GatherDimensionNumbers(offset_dims=(4, 5), collapsed_slice_dims=(0, 2), start_index_map=(0, 1, 2))


def _gather_blocks(k, idx, bs):
    """k [B,Tk,Hkv,D], idx [B,Hkv,C,K] -> blocks [B,Hkv,C,K,bs,D] and their key positions [B,Hkv,C,K,bs].

    The start of a partial last block is clamped to Tk - bs (nothing is padded); the rows this brings in belong to
    the previous block and are masked by `pos >= idx * bs` where the blocks are used.
    """
    b, tk, hkv, d = k.shape
    start = jnp.clip(idx * bs, 0, max(tk - bs, 0))
    shape = idx.shape
    bi = jnp.broadcast_to(jnp.arange(b)[:, None, None, None], shape)
    gi = jnp.broadcast_to(jnp.arange(hkv)[None, :, None, None], shape)
    starts = jnp.stack([bi, start, gi], axis=-1)
    blocks = jax.lax.gather(k, starts, _block_dnums(), slice_sizes=(1, bs, 1, d),
                            mode=jax.lax.GatherScatterMode.CLIP)
    return blocks, start[..., None] + jnp.arange(bs, dtype=jnp.int32)


def _chunk_fwd_all_blocks(q, t, idx, count, k, v, cfg):
    """Decode form: q [B,C,Hq,D] (one or a few queries); each query gathers its listed blocks, one softmax over them.

    With a single query nothing is shared between queries and ~96 blocks fit in cache, so one [G, D] x [D, K*bs]
    product per group is simplest and fastest. Returns out [B,C,Hq,D] f32 and lse [B*Hkv,C,G].
    """
    b, c, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    bs = cfg.block_size
    scale = 1.0 / math.sqrt(d)
    qm = q.reshape(b, c, hkv, g, d).transpose(0, 2, 1, 3, 4).astype(jnp.float32)          # [B,Hkv,C,G,D]
    kb, pos = _gather_blocks(k, idx, bs)
    vb, _ = _gather_blocks(v, idx, bs)
    nsl = idx.shape[-1]
    kb = kb.reshape(b, hkv, c, nsl * bs, d).astype(jnp.float32)
    vb = vb.reshape(b, hkv, c, nsl * bs, d).astype(jnp.float32)
    ok = (jnp.arange(nsl) < count[..., None])[..., None] & (pos >= (idx * bs)[..., None]) & \
        (pos <= t[:, None, :, None, None])
    # keys-major logits [.., K*bs, G]: the gathered keys are the tall operand of the matmul (as in the decode
    # kernel scoring), which XLA:CPU runs faster than [G, D] x [D, K*bs]
    s = jnp.einsum("bhcsd,bhcnd->bhcsn", kb, qm) * scale
    s = jnp.where(ok.reshape(b, hkv, c, nsl * bs, 1), s, -jnp.inf)
    m = s.max(axis=-2)
    p = jnp.exp(s - m[..., None, :])
    l = p.sum(axis=-2)
    o = jnp.einsum("bhcsn,bhcsd->bhcnd", p, vb) / l[..., None]
    o = o.transpose(0, 2, 1, 3, 4).reshape(b, c, hq, d)
    return o, (m + jnp.log(l)).reshape(b * hkv, c, g)


def sparse_decode_xla(q, k, v, lists: BlockLists, t, cfg: SparseConfig) -> jax.Array:
    """Forward-only attention of a few decode queries q [B,C,Hq,D] at positions t [B,C] over the blocks in `lists`
    ([B,Hkv,C,K]); k, v: the cache [B,S,Hkv,D]. Returns [B,C,Hq,D] in q.dtype."""
    if k.shape[1] < cfg.block_size:  # block slices read whole blocks (as in sparse_attention_xla)
        pad = ((0, 0), (0, cfg.block_size - k.shape[1]), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    return _chunk_fwd_all_blocks(q, t, lists.idx, lists.count, k, v, cfg)[0].astype(q.dtype)


# ------------------------------------------------------------------------------------------------------ layouts
# Inside the prefill path a "row" r = (batch, KV group): queries [R, Tq, G, D], keys/values [R, Tk, D], positions
# [R, Tq]. Batch dims lead in every matmul operand, so each einsum is a plain batched matmul on XLA:CPU.
def _q_rows(x, hkv):
    b, t, hq, d = x.shape
    g = hq // hkv
    return x.reshape(b, t, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b * hkv, t, g, d).astype(jnp.float32)


def _q_unrows(x, b, hkv):
    r, t, g, d = x.shape
    return x.reshape(b, hkv, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, hkv * g, d)


def _kv_rows(k):
    b, tk, h, d = k.shape
    return k.transpose(0, 2, 1, 3).reshape(b * h, tk, d).astype(jnp.float32)


def _kv_unrows(x, b, hkv):
    r, tk, d = x.shape
    return x.reshape(b, hkv, tk, d).transpose(0, 2, 1, 3)


def _t_rows(t, hkv):
    return jnp.repeat(t, hkv, axis=0)


def _rows_idx(x):
    """[B, Hkv, Tq, ...] -> [B*Hkv, Tq, ...]."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


# ------------------------------------------------------------------------------------------ shared part (dense)
def band_width(tk: int, chunk: int, cfg: SparseConfig) -> int:
    """Keys in the contiguous band covering the windows of `chunk` consecutive queries (clamped to Tk)."""
    bs = cfg.block_size
    return min(tk, (cfg.local_blocks - 1 + (chunk - 1) // bs + 2) * bs)


def _init_len(tk: int, cfg: SparseConfig) -> int:
    return min(cfg.init_blocks * cfg.block_size, tk)


def _shared_keys(kr, vr, t0, cfg, w):
    """Init keys + window band for a chunk whose first query is at t0 [R]: K, V [R, NI+W, D], positions [R, NI+W]."""
    tk = kr.shape[1]
    bs, n = cfg.block_size, cfg.local_blocks
    ni = _init_len(tk, cfg)
    start = jnp.clip((t0 // bs - n + 1) * bs, 0, tk - w)
    band = lambda x: jax.vmap(lambda xx, st: jax.lax.dynamic_slice_in_dim(xx, st, w, axis=0))(x, start)
    pos = start[:, None] + jnp.arange(w, dtype=jnp.int32)[None]
    kk, vv = band(kr), band(vr)
    if ni:
        kk = jnp.concatenate([kr[:, :ni], kk], axis=1)
        vv = jnp.concatenate([vr[:, :ni], vv], axis=1)
        pos = jnp.concatenate([jnp.broadcast_to(jnp.arange(ni, dtype=jnp.int32), (pos.shape[0], ni)), pos], 1)
    return kk, vv, pos, start


def _shared_mask(pos, tc, cfg, ni):
    """[R, C, NI+W]: the NI init keys, or window keys (qb-n < b, b >= init_blocks: the band may also hold init
    blocks, masked there), and pos <= t."""
    bs, n = cfg.block_size, cfg.local_blocks
    kb = (pos // bs)[:, None, :]
    qb = (tc // bs)[:, :, None]
    ok = (kb > qb - n) & (kb >= cfg.init_blocks)
    if ni:
        ok = ok | (jnp.arange(pos.shape[1]) < ni)[None, None, :]
    return ok & (pos[:, None, :] <= tc[:, :, None])


def _shared_logits(qc, tc, kr, vr, cfg, w, scale):
    """qc [R,C,G,D] -> masked logits [R,C,G,NI+W], keys, values [R,NI+W,D], band start [R]."""
    r, c, g, d = qc.shape
    kk, vv, pos, start = _shared_keys(kr, vr, tc[:, 0], cfg, w)
    s = jnp.einsum("rmd,rwd->rmw", qc.reshape(r, c * g, d), kk).reshape(r, c, g, -1) * scale
    s = jnp.where(_shared_mask(pos, tc, cfg, _init_len(kr.shape[1], cfg))[:, :, None, :], s, -jnp.inf)
    return s, kk, vv, start


def _shared_fwd(qc, tc, kr, vr, cfg, w):
    """Unnormalised shared-part attention of one chunk: acc [R,C,G,D], row max m and sum l [R,C,G]."""
    r, c, g, d = qc.shape
    s, _, vv, _ = _shared_logits(qc, tc, kr, vr, cfg, w, 1.0 / math.sqrt(d))
    m = s.max(axis=-1)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # (always finite: the query's own key is in the shared part)
    p = jnp.exp(s - m[..., None])
    acc = jnp.einsum("rmw,rwd->rmd", p.reshape(r, c * g, -1), vv).reshape(r, c, g, d)
    return acc, m, p.sum(axis=-1)


def _shared_bwd(qc, tc, doc, lse, delta, kr, vr, cfg, w, dk, dv):
    """Shared-part gradients of one chunk: dq [R,C,G,D]; dk, dv [R,Tk,D] with the chunk's part added."""
    r, c, g, d = qc.shape
    scale = 1.0 / math.sqrt(d)
    s, kk, vv, start = _shared_logits(qc, tc, kr, vr, cfg, w, scale)
    p = jnp.exp(s - lse[..., None]).reshape(r, c * g, -1)
    qm, dom = qc.reshape(r, c * g, d), doc.reshape(r, c * g, d)
    dp = jnp.einsum("rmd,rwd->rmw", dom, vv)
    ds = p * (dp - delta.reshape(r, c * g, 1)) * scale
    dq = jnp.einsum("rmw,rwd->rmd", ds, kk).reshape(r, c, g, d)
    dkk = jnp.einsum("rmw,rmd->rwd", ds, qm)
    dvv = jnp.einsum("rmw,rmd->rwd", p, dom)
    ni = dkk.shape[1] - w

    def add(acc, upd):
        if ni:
            acc = acc.at[:, :ni].add(upd[:, :ni])

        def add_band(a, u, st):
            cur = jax.lax.dynamic_slice_in_dim(a, st, w, axis=0)
            return jax.lax.dynamic_update_slice_in_dim(a, cur + u, st, axis=0)

        return jax.vmap(add_band)(acc, upd[:, ni:], start)

    return dq, add(dk, dkk), add(dv, dvv)


# ---------------------------------------------------------------------------------------------- top-k schedule
class Schedule(NamedTuple):
    """Top-k (query, block) pairs grouped by query range and block, cut into tiles of `tile` pairs sharing a block.

    Queries of a row are cut into ranges of `span` (the rows padded to a multiple of it); range u = r * n_ranges + j
    holds queries j*span .. (j+1)*span-1 of row r. Its results are accumulated in a range-local buffer, which stays
    in cache, and written out once.
    tok     [N + tile] int32  range-local query index of every pair, sorted by (range, block); a tail of `tile` x span
    key     [NT] int32        u * n_blocks + block of each tile
    start   [NT] int32        first pair of each tile in `tok`
    cnt     [NT] int32        valid pairs in each tile (<= tile)
    rstart  [NU + 1] int32    first tile of each range (tiles of range u: rstart[u] .. rstart[u+1]-1)
    """
    tok: jax.Array
    key: jax.Array
    start: jax.Array
    cnt: jax.Array
    rstart: jax.Array


def _schedule(idx_top, n_top, cfg: SparseConfig, nb: int, tile: int, span: int) -> Schedule:
    """idx_top [R, Tq, kt] block picks, n_top [R, Tq] valid picks -> Schedule (init-block picks left out)."""
    r, tq, kt = idx_top.shape
    nr = -(-tq // span)
    valid = (jnp.arange(kt) < n_top[..., None]) & (idx_top >= cfg.init_blocks)
    nkeys = r * nr * nb
    i = jnp.arange(tq, dtype=jnp.int32)
    u = jnp.arange(r, dtype=jnp.int32)[:, None] * nr + i[None, :] // span                 # [R, Tq]
    key = jnp.where(valid, (u * nb)[..., None] + idx_top, nkeys).reshape(-1).astype(jnp.int32)
    tok = jnp.broadcast_to((i % span)[None, :, None], (r, tq, kt)).reshape(-1)
    key, tok = jax.lax.sort((key, tok), num_keys=1, is_stable=True)
    tok = jnp.concatenate([tok, jnp.full((tile,), span, jnp.int32)])  # tail: a last tile's slice stays in bounds
    bounds = jnp.searchsorted(key, jnp.arange(nkeys + 1, dtype=jnp.int32), side="left").astype(jnp.int32)
    cnt = bounds[1:] - bounds[:-1]
    tstart = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum((cnt + tile - 1) // tile, dtype=jnp.int32)])
    n_static = -(-key.shape[0] // tile) + nkeys
    ti = jnp.arange(n_static, dtype=jnp.int32)
    tkey = jnp.clip(jnp.searchsorted(tstart, ti, side="right").astype(jnp.int32) - 1, 0, nkeys - 1)
    j = ti - tstart[tkey]
    start = bounds[tkey] + j * tile
    tcnt = jnp.clip(cnt[tkey] - j * tile, 0, tile)
    return Schedule(tok, tkey, start, tcnt, tstart[::nb])


def _span(tq: int, span: int) -> int:
    return min(span, tq)


def _tile_inputs(sched: Schedule, i, kf, vf, tk, nb, nr, bs, tile, span):
    """Tile i: range-local query ids [tile] (slots past the tile's count -> span, out of range), its block's keys
    and values [bs, D] and their offset in kf."""
    key, st, cnt = sched.key[i], sched.start[i], sched.cnt[i]
    ids = jnp.where(jnp.arange(tile) < cnt, jax.lax.dynamic_slice_in_dim(sched.tok, st, tile), span)
    off = (key // (nb * nr)) * tk + (key % nb) * bs
    kb = jax.lax.dynamic_slice_in_dim(kf, off, bs, axis=0)
    vb = jax.lax.dynamic_slice_in_dim(vf, off, bs, axis=0)
    return ids, kb, vb, off


def _rows_of(x, ids):
    """x[ids] along axis 0, clamped (out-of-range ids read the last row; their results are dropped)."""
    return jnp.take(x, ids, axis=0, mode="clip")


def _head_rows(ids, g):
    """Query ids [n] -> row ids [n*g] of their heads in a [queries*g, ...] array (out-of-range stays out of range)."""
    return (ids[:, None] * g + jnp.arange(g, dtype=ids.dtype)).reshape(-1)


def _add_rows(acc, rows, upd):
    """acc [N, ...] with upd [n, ...] added at rows [n] (rows >= N are dropped).

    One lax.scatter per tile. Scattering per (query, head) rows of D floats is far cheaper on XLA:CPU than per
    query rows of G*D floats: jnp's .at[].add on [n, G*D] updates inserts a unit dimension whose layout costs a
    copy of every update, and the wide-window scatter loop is slower.
    """
    dn = jax.lax.ScatterDimensionNumbers(update_window_dims=tuple(range(1, upd.ndim)), inserted_window_dims=(0,),
                                         scatter_dims_to_operand_dims=(0,))
    return jax.lax.scatter_add(acc, rows[:, None], upd, dn, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def _max_rows(acc, rows, upd):
    dn = jax.lax.ScatterDimensionNumbers(update_window_dims=tuple(range(1, upd.ndim)), inserted_window_dims=(0,),
                                         scatter_dims_to_operand_dims=(0,))
    return jax.lax.scatter_max(acc, rows[:, None], upd, dn, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def _pad_rows(x, tq, tp):
    """[R, Tq, ...] -> [R*Tp, ...] (rows padded with zeros to Tp)."""
    if tp != tq:
        x = jnp.pad(x, [(0, 0), (0, tp - tq)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape((-1,) + x.shape[2:])


def _over_ranges(sched, per_range, outs):
    """For each range u: outs = per_range(u, tiles lo..hi, outs) (a loop over ranges with a loop over tiles)."""
    def body(u, outs):
        return per_range(u, sched.rstart[u], sched.rstart[u + 1], outs)

    return jax.lax.fori_loop(0, sched.rstart.shape[0] - 1, body, outs)


def _topk_fwd_pass(qf, kf, vf, cf, sched, tk, nb, nr, cfg, tile, span, max_only=False):
    """Sum over top-k tiles of exp(s - c) V and exp(s - c) per (query, head); or (max_only) the max logit.

    qf [R*Tp, G*D] queries pre-scaled by 1/sqrt(D) (rows padded to Tp = nr*span), kf/vf [R*Tk, D], cf [R*Tp, G]
    shift. Returns acc [R*Tp, G*D] and l [R*Tp, G]; or the max logit [R*Tp, G] (-inf where no top-k block).
    """
    nq, gd = qf.shape
    d = kf.shape[1]
    g = gd // d
    bs = cfg.block_size

    def per_range(u, lo, hi, outs):
        q_u = jax.lax.dynamic_slice_in_dim(qf, u * span, span)
        c_u = jax.lax.dynamic_slice_in_dim(cf, u * span, span)

        def body(i, carry):
            ids, kb, vb, _ = _tile_inputs(sched, i, kf, vf, tk, nb, nr, bs, tile, span)
            s = jnp.einsum("md,kd->mk", _rows_of(q_u, ids).reshape(tile * g, d), kb)
            rows = _head_rows(ids, g)
            if max_only:
                return _max_rows(carry, rows, s.max(-1))
            acc, l = carry
            p = jnp.exp(s - _rows_of(c_u, ids).reshape(tile * g, 1))
            o = jnp.einsum("mk,kd->md", p, vb)
            return _add_rows(acc, rows, o), _add_rows(l, rows, p.sum(-1))

        if max_only:
            init = jnp.full((span * g,), -jnp.inf, jnp.float32)
        else:
            init = (jnp.zeros((span * g, d), jnp.float32), jnp.zeros((span * g,), jnp.float32))
        res = jax.lax.fori_loop(lo, hi, body, init)
        put = lambda o, x: jax.lax.dynamic_update_slice_in_dim(o, x.reshape((span,) + o.shape[1:]), u * span, 0)
        return jax.tree.map(put, outs, res)

    if max_only:
        outs = jnp.full((nq, g), -jnp.inf, jnp.float32)
    else:
        outs = (jnp.zeros((nq, gd), jnp.float32), jnp.zeros((nq, g), jnp.float32))
    return _over_ranges(sched, per_range, outs)


def _topk_fwd(qf, kf, vf, c0, sched, tk, nb, nr, cfg, tile, span):
    """_topk_fwd_pass with the shift c0 (the shared part's row max); -> (shift, acc, l).

    exp(s - c0) can overflow only if a top-k logit exceeds c0 by ~80; then acc or l is not finite, and the pass is
    redone with the shift raised to the largest top-k logit (a logits-only pass finds it). Where nothing
    overflows the sums are exact: a term that underflows is < e^-87 times the shared part's largest term (weight 1).
    """
    acc, l = _topk_fwd_pass(qf, kf, vf, c0, sched, tk, nb, nr, cfg, tile, span)
    ok = jnp.isfinite(l).all() & jnp.isfinite(acc).all()

    def redo(_):
        c1 = jnp.maximum(c0, _topk_fwd_pass(qf, kf, vf, c0, sched, tk, nb, nr, cfg, tile, span, max_only=True))
        return (c1,) + _topk_fwd_pass(qf, kf, vf, c1, sched, tk, nb, nr, cfg, tile, span)

    return jax.lax.cond(ok, lambda _: (c0, acc, l), redo, None)


def _topk_bwd(qf, dof, lse, delta, kf, vf, sched, tk, nb, nr, cfg, tile, span, dk, dv):
    """Top-k gradients. qf [R*Tp, G*D] pre-scaled queries, dof [R*Tp, G*D], lse/delta [R*Tp, G].

    Returns dq [R*Tp, G*D] (w.r.t. the pre-scaled queries) and dk, dv [R*Tk, D] with the top-k part added.
    Invalid tile rows gather q = do = 0 and lse = inf, so their p and ds are exactly 0.
    """
    nq, gd = qf.shape
    d = kf.shape[1]
    g = gd // d
    bs = cfg.block_size
    fill = lambda x, ids, v: jnp.take(x, ids, axis=0, mode="fill", fill_value=v)

    def per_range(u, lo, hi, outs):
        dq_all, dk, dv = outs
        q_u, do_u, lse_u, delta_u = (jax.lax.dynamic_slice_in_dim(x, u * span, span) for x in (qf, dof, lse, delta))

        def body(i, carry):
            dq, dk, dv = carry
            ids, kb, vb, off = _tile_inputs(sched, i, kf, vf, tk, nb, nr, bs, tile, span)
            qg = fill(q_u, ids, 0.0).reshape(tile * g, d)
            dog = fill(do_u, ids, 0.0).reshape(tile * g, d)
            s = jnp.einsum("md,kd->mk", qg, kb)
            p = jnp.exp(s - fill(lse_u, ids, jnp.inf).reshape(tile * g, 1))
            dp = jnp.einsum("md,kd->mk", dog, vb)
            ds = p * (dp - fill(delta_u, ids, 0.0).reshape(tile * g, 1))
            dq = _add_rows(dq, _head_rows(ids, g), jnp.einsum("mk,kd->md", ds, kb))
            dkb = jnp.einsum("mk,md->kd", ds, qg)
            dvb = jnp.einsum("mk,md->kd", p, dog)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, jax.lax.dynamic_slice_in_dim(dk, off, bs) + dkb, off, 0)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, jax.lax.dynamic_slice_in_dim(dv, off, bs) + dvb, off, 0)
            return dq, dk, dv

        dq, dk, dv = jax.lax.fori_loop(lo, hi, body, (jnp.zeros((span * g, d), jnp.float32), dk, dv))
        return jax.lax.dynamic_update_slice_in_dim(dq_all, dq.reshape(span, gd), u * span, axis=0), dk, dv

    return _over_ranges(sched, per_range, (jnp.zeros((nq, gd), jnp.float32), dk, dv))


# ------------------------------------------------------------------------------------------------- prefill path
def _split(x, axis, c, nc, mode="edge"):
    """Pad axis to nc*c (edge values, or zeros with mode="constant") and move the chunk index to the front."""
    pad = nc * c - x.shape[axis]
    if pad:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, pad)
        x = jnp.pad(x, widths, mode=mode)
    x = x.reshape(x.shape[:axis] + (nc, c) + x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _merge(x, axis, n):
    """Inverse of _split for an output whose chunk axis was stacked at 0 and token axis sits at `axis`."""
    x = jnp.moveaxis(x, 0, axis)
    x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
    return jax.lax.slice_in_dim(x, 0, n, axis=axis)


def _map_chunks(fn, xs, nc):
    if nc == 1:  # no loop, so XLA does not thread the whole K/V through a while op
        return jax.tree.map(lambda a: a[None], fn(jax.tree.map(lambda a: a[0], xs)))
    return jax.lax.map(fn, xs)


def _make_schedule(lists: BlockLists, tk, cfg, tile, span):
    nb = num_blocks(tk, cfg)
    kt = lists.idx.shape[-1] - cfg.local_blocks
    return _schedule(_rows_idx(lists.idx[..., :kt]), _rows_idx(lists.n_top), cfg, nb, tile, span)


def _prefill_fwd(q, k, v, t, lists: BlockLists, cfg, chunk, tile, span):
    """-> out [B,Tq,Hq,D] f32, lse [R,Tq,G], schedule."""
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    nb = num_blocks(tk, cfg)
    qr, kr, vr, tr = _q_rows(q, hkv), _kv_rows(k), _kv_rows(v), _t_rows(t, hkv)
    r, _, g, _ = qr.shape
    c = min(chunk, tq)
    nc = -(-tq // c)
    w = band_width(tk, c, cfg)
    acc_w, m_w, l_w = _map_chunks(lambda x: _shared_fwd(x[0], x[1], kr, vr, cfg, w),
                                  (_split(qr, 1, c, nc), _split(tr, 1, c, nc)), nc)
    acc_w, m_w, l_w = _merge(acc_w, 1, tq), _merge(m_w, 1, tq), _merge(l_w, 1, tq)
    span = _span(tq, span)
    nr = -(-tq // span)
    tp = nr * span
    sched = _make_schedule(lists, tk, cfg, tile, span)
    qs = _pad_rows(qr * (1.0 / math.sqrt(d)), tq, tp).reshape(r * tp, g * d)
    cf, acc_t, l_t = _topk_fwd(qs, kr.reshape(r * tk, d), vr.reshape(r * tk, d), _pad_rows(m_w, tq, tp), sched, tk,
                               nb, nr, cfg, tile, span)
    cf = cf.reshape(r, tp, g)[:, :tq]
    a = jnp.exp(m_w - cf)
    den = l_w * a + l_t.reshape(r, tp, g)[:, :tq]
    o = (acc_w * a[..., None] + acc_t.reshape(r, tp, g, d)[:, :tq]) / den[..., None]
    return _q_unrows(o, b, hkv), cf + jnp.log(den), sched


def _prefill_bwd(q, k, v, t, sched, o, lse, do, cfg, chunk, tile, span):
    b, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    nb = num_blocks(tk, cfg)
    qr, kr, vr, tr = _q_rows(q, hkv), _kv_rows(k), _kv_rows(v), _t_rows(t, hkv)
    dor = _q_rows(do, hkv)
    delta = jnp.sum(dor * _q_rows(o, hkv), axis=-1)                             # [R, Tq, G]
    r, _, g, _ = qr.shape
    c = min(chunk, tq)
    nc = -(-tq // c)
    w = band_width(tk, c, cfg)
    # padded (duplicated) queries get do = 0 and delta = 0, so they contribute nothing
    dor_s, delta_s = (_split(x, 1, c, nc, mode="constant") for x in (dor, delta))
    xs = (_split(qr, 1, c, nc), _split(tr, 1, c, nc), dor_s, _split(lse, 1, c, nc), delta_s)

    def step(carry, x):
        qc, tc, doc, lc, dc = x
        dq, dk, dv = _shared_bwd(qc, tc, doc, lc, dc, kr, vr, cfg, w, *carry)
        return (dk, dv), dq

    zeros = jnp.zeros(kr.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), xs)
    dq = _merge(dq, 1, tq)
    span = _span(tq, span)
    nr = -(-tq // span)
    tp = nr * span
    scale = 1.0 / math.sqrt(d)
    flat = lambda x: _pad_rows(x, tq, tp).reshape(r * tp, -1)
    dq_t, dk, dv = _topk_bwd(flat(qr * scale), flat(dor), flat(lse), flat(delta), kr.reshape(r * tk, d),
                             vr.reshape(r * tk, d), sched, tk, nb, nr, cfg, tile, span, dk.reshape(r * tk, d),
                             dv.reshape(r * tk, d))
    dq = dq + dq_t.reshape(r, tp, g, d)[:, :tq] * scale
    return _q_unrows(dq, b, hkv), _kv_unrows(dk.reshape(r, tk, d), b, hkv), _kv_unrows(dv.reshape(r, tk, d), b, hkv)


def _fwd_impl(q, k, v, t, lists, cfg, chunk, tile, span):
    if q.shape[1] == 1:  # decode
        o, lse = _chunk_fwd_all_blocks(q, t, lists.idx, lists.count, k, v, cfg)
        return o, lse, None
    return _prefill_fwd(q, k, v, t, lists, cfg, chunk, tile, span)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _sparse_attention(q, k, v, t, lists, cfg, chunk, tile, span):
    return _fwd_impl(q, k, v, t, lists, cfg, chunk, tile, span)[0].astype(q.dtype)


def _vjp_fwd(q, k, v, t, lists, cfg, chunk, tile, span):
    o, lse, sched = _fwd_impl(q, k, v, t, lists, cfg, chunk, tile, span)
    o = o.astype(q.dtype)
    if sched is None:
        sched = _make_schedule(lists, k.shape[1], cfg, tile, _span(q.shape[1], span))
    return o, (q, k, v, t, sched, o, lse)


def _vjp_bwd(cfg, chunk, tile, span, res, do):
    q, k, v, t, sched, o, lse = res
    dq, dk, dv = _prefill_bwd(q, k, v, t, sched, o, lse, do, cfg, chunk, tile, span)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_sparse_attention.defvjp(_vjp_fwd, _vjp_bwd)


def sparse_attention_xla(q, k, v, lists: BlockLists, t, cfg: SparseConfig, *, chunk: int = 64, tile: int = 128,
                         span: int = 2048) -> jax.Array:
    """Attention of q [B,Tq,Hq,D] at positions t [B,Tq] over the blocks in `lists` (see select.py).

    k, v: [B,Tk,Hkv,D]. Returns [B,Tq,Hq,D] in q.dtype (fp32 math). Differentiable w.r.t. q, k, v.
    chunk: queries per step of the shared (init + window) part; tile: (query, block) pairs per top-k step;
    span: queries whose top-k results are accumulated together (a span*G*D float buffer that should stay in cache).
    """
    lists = jax.tree.map(jax.lax.stop_gradient, lists)
    if k.shape[1] < cfg.block_size:  # block slices read whole blocks; pad a tiny sequence (keys > t are masked)
        pad = ((0, 0), (0, cfg.block_size - k.shape[1]), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
    return _sparse_attention(q, k, v, t, lists, cfg, chunk, tile, span)
