"""Both InfLLM v2 variants ("minicpm4", "minicpm4.1"), with and without `lse_approx`, in every implementation,
against an independent brute force written from the formulas of spec §2.2-2.3 / issue #11.

The brute force below is numpy float64 loops over rows, queries, groups and heads; it imports nothing from
minicpm_jax.sparse but the public API under test (and SparseConfig, read only through its raw fields). For a query
at absolute position t, qb = t // bs, n = window_size // bs:
  Kc1[j] = mean(K[j*st : j*st+ks]) (complete kernels), visible iff j*st + ks - 1 <= t;
  Kc2[j] = mean(K[4*st*j : 4*st*j + 4*ks]), visible iff 4*st*j + 4*ks - 1 <= t (lse_approx only);
  S[g,j] = sum_{h in g} exp(q_h.Kc1_j/sqrt(D) - N_h), N_h = logsumexp of the visible fine logits, or with
           lse_approx of the visible coarse logits (the fine one while no coarse kernel is visible); 0 if invisible;
  blk[g,b] = max over visible kernels whose span meets block b (0 if none);
  "minicpm4":   init +inf, window qb-n+1..qb -inf, future -inf, top-min(topk, NB), attended = picks > -inf U window;
  "minicpm4.1": init and qb-n..qb +inf, future -inf, top-min(topk+n, NB), attended = picks > -inf;
  ties toward the lower block index; then softmax attention over the attended blocks with key pos <= t.

Inputs: every KV block carries its own random relevance for each query head of a group along that head's own
orthonormal direction, so the heads of a group rank the blocks differently and a wrong group aggregation (one head,
mean of logits, max over heads) selects other blocks (checked below, so these tests can fail). The seed is chosen so
that every selection is decided by more than MARGIN (relative) between the kernel score at the top-k cut and every
other kernel score, far above fp32 rounding (~1e-6); exact ties (one straddling kernel the max of two blocks) have
their own test. Pallas kernels (GPU/Triton and TPU/Mosaic) run in interpret mode, so their shapes stay tiny.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.sparse import (SparseConfig, compressed_cache_from_keys, infllm_v2_attention, infllm_v2_decode,
                                init_compressed_cache, select_blocks, update_compressed_cache)

MARGIN = 1e-4        # relative gap between the kernel score at the top-k cut and every other kernel score
FWD_TOL, GRAD_TOL = 1e-5, 1e-4

# Scaled-down geometry: block 16, kernel 8, stride 4 (block = 2 kernels = 4 strides, as 64/32/16), coarse 32/16.
CASES = {
    # G=2 (two KV groups), init 1, two rows, T=150 (not a multiple of 16): 10 blocks, up to 7 candidates for 3 slots
    "g2i1": dict(b=2, t=150, hq=4, hkv=2, d=16, seed=1,
                 geom=dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=4)),
    # G=4, init 2, T=131: 9 blocks
    "g4i2": dict(b=1, t=131, hq=4, hkv=1, d=8, seed=5,
                 geom=dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=2, window_size=32, topk=5)),
    # kernel = block (16/4): the first coarse kernel (64 keys) is complete only at t = 63, while top-k already
    # chooses from t = 32 ("minicpm4") / 48 ("minicpm4.1"): the no-coarse-kernel-yet normaliser decides those rows
    "g4nocoarse": dict(b=1, t=90, hq=4, hkv=1, d=8, seed=2,
                       geom=dict(block_size=16, kernel_size=16, kernel_stride=4, init_blocks=0, window_size=16,
                                 topk=2)),
}

VARIANT_LSE = [pytest.param(v, lse, id=f"{v}-lse{int(lse)}")
               for v in ("minicpm4", "minicpm4.1") for lse in (False, True)]


def make_cfg(case: str, variant: str, lse: bool, **over) -> SparseConfig:
    geom = dict(CASES[case]["geom"], **over)
    return SparseConfig(**geom, dense_len=0, variant=variant, lse_approx=lse)


# ------------------------------------------------------------------------------------------------ brute force

def _lse(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return m + math.log(np.exp(x - m).sum())


def bf_kernels(kr, ks, st):
    """Complete kernel means of one row's keys kr [Tk, Hkv, D] -> [n, Hkv, D] float64."""
    n = max((kr.shape[0] - ks) // st + 1, 0)
    out = np.zeros((n,) + kr.shape[1:])
    for j in range(n):
        out[j] = kr[j * st: j * st + ks].mean(axis=0)
    return out


def bf_kernel_scores(qv, kc1, kc2, t, cfg: SparseConfig, lse: bool, agg: str = "sum"):
    """One query qv [Hq, D] at position t -> S [Hkv, n1] (0 where invisible) and the visible kernel ids.

    agg: "sum" (the formula) or a wrong aggregation for the sanity checks: "head0" (the first head of each group
    alone), "mean_logit" (exp of the group-mean logit), "max" (max of the head probabilities), "unnormalised"
    (sum of exp(logit): no per-head normaliser at all)."""
    hq, d = qv.shape
    hkv = kc1.shape[1]
    g = hq // hkv
    ks, st = cfg.kernel_size, cfg.kernel_stride
    vis1 = [j for j in range(kc1.shape[0]) if j * st + ks - 1 <= t]
    vis2 = [j for j in range(kc2.shape[0]) if 4 * st * j + 4 * ks - 1 <= t]
    s = np.zeros((hkv, kc1.shape[0]))
    if not vis1:
        return s, vis1
    for gi in range(hkv):
        heads = list(range(gi * g, (gi + 1) * g))
        logits = {}
        for h in heads:
            logits[h] = np.array([float(qv[h] @ kc1[j, gi]) for j in vis1]) / math.sqrt(d)
        if agg == "mean_logit":
            s[gi, vis1] = np.exp(np.mean([logits[h] for h in heads], axis=0))
            continue
        for h in heads:
            if agg == "unnormalised":
                norm = 0.0
            elif lse and vis2:
                norm = _lse([float(qv[h] @ kc2[i, gi]) / math.sqrt(d) for i in vis2])
            else:
                norm = _lse(logits[h])
            p = np.exp(logits[h] - norm)
            if agg in ("sum", "unnormalised"):
                s[gi, vis1] += p
            elif agg == "head0":
                if h == heads[0]:
                    s[gi, vis1] = p
            elif agg == "max":
                s[gi, vis1] = np.maximum(s[gi, vis1], p)
            else:
                raise ValueError(agg)
    return s, vis1


def bf_block_scores(s, vis, nb, cfg: SparseConfig):
    """blk [Hkv, NB] and, per block, the kernel giving its max (-1 if none)."""
    bs, ks, st = cfg.block_size, cfg.kernel_size, cfg.kernel_stride
    blk = np.zeros((s.shape[0], nb))
    arg = np.full((s.shape[0], nb), -1)
    for gi in range(s.shape[0]):
        for b in range(nb):
            meets = [j for j in vis if j * st < (b + 1) * bs and j * st + ks > b * bs]
            if meets:
                jm = max(meets, key=lambda j: s[gi, j])
                blk[gi, b], arg[gi, b] = s[gi, jm], jm
    return blk, arg


def bf_choose(blk_g, t, nb, cfg: SparseConfig, variant: str):
    """Stage 3 for one (group, query): attended block set, and the cut (last finite pick, first finite drop)."""
    bs = cfg.block_size
    n = cfg.window_size // bs
    qb = t // bs
    s = blk_g.astype(np.float64).copy()
    if variant == "minicpm4":
        window = [b for b in range(max(qb - n + 1, 0), qb + 1)]
        for b in range(nb):
            if b < cfg.init_blocks:
                s[b] = np.inf
            if qb - n + 1 <= b <= qb:
                s[b] = -np.inf
        k = min(cfg.topk, nb)
    else:
        window = []
        for b in range(nb):
            if b < cfg.init_blocks or qb - n <= b <= qb:
                s[b] = np.inf
        k = min(cfg.topk + n, nb)
    for b in range(nb):
        if b > qb:
            s[b] = -np.inf
    order = sorted(range(nb), key=lambda b: (-s[b], b))
    picks = [b for b in order[:k] if s[b] > -np.inf]
    finite_kept = [b for b in order[:k] if np.isfinite(s[b])]
    finite_dropped = [b for b in order[k:] if np.isfinite(s[b])]
    cut = finite_kept[-1] if (finite_kept and finite_dropped) else None
    return set(picks) | set(window), cut, [b for b in range(nb) if np.isfinite(s[b])]


def bf_select(q, k, pos, cfg: SparseConfig, *, agg: str = "sum", with_margin: bool = False):
    """q [B,Tq,Hq,D], k [B,Tk,Hkv,D], pos [B,Tq] absolute query positions -> bool [B,Hkv,Tq,NB]
    (and the smallest selection margin over all rows, groups and queries if with_margin)."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    bsz, tq = q.shape[:2]
    tk, hkv = k.shape[1], k.shape[2]
    nb = -(-tk // cfg.block_size)
    lse = cfg.lse_approx
    out = np.zeros((bsz, hkv, tq, nb), bool)
    margin = np.inf
    for bi in range(bsz):
        kc1 = bf_kernels(k[bi], cfg.kernel_size, cfg.kernel_stride)
        kc2 = bf_kernels(k[bi], 4 * cfg.kernel_size, 4 * cfg.kernel_stride)
        for i in range(tq):
            t = int(pos[bi, i])
            s, vis = bf_kernel_scores(q[bi, i], kc1, kc2, t, cfg, lse, agg)
            blk, arg = bf_block_scores(s, vis, nb, cfg)
            for gi in range(hkv):
                att, cut, finite = bf_choose(blk[gi], t, nb, cfg, cfg.variant)
                out[bi, gi, i, sorted(att)] = True
                if with_margin and cut is not None:
                    jstar = arg[gi, cut]
                    v = s[gi, jstar]
                    # every other kernel that can score a finite candidate must stay clear of the cut value:
                    # then fp32 rounding can neither reorder blocks across the cut nor change which kernel is a
                    # block's max (exact ties, one straddling kernel maxing two blocks, stay exact in fp32)
                    others = {j for b in finite for j in vis
                              if j * cfg.kernel_stride < (b + 1) * cfg.block_size
                              and j * cfg.kernel_stride + cfg.kernel_size > b * cfg.block_size}
                    others.discard(int(jstar))
                    for j in others:
                        margin = min(margin, abs(s[gi, j] - v) / abs(v))
    return (out, margin) if with_margin else out


def bf_attention(q, k, v, pos, mask, bs, w):
    """Masked softmax attention in float64 and its gradients for the loss sum(o * w).

    mask [B,Hkv,Tq,NB] attended blocks; returns o [B,Tq,Hq,D], (dq, dk, dv)."""
    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
    bsz, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    o = np.zeros_like(q)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    kpos = np.arange(tk)
    for bi in range(bsz):
        for h in range(hq):
            gi = h // g
            allowed = mask[bi, gi][:, kpos // bs] & (kpos[None, :] <= np.asarray(pos[bi])[:, None])  # [Tq, Tk]
            kk, vv, qq = k[bi, :, gi], v[bi, :, gi], q[bi, :, h]
            lg = np.where(allowed, qq @ kk.T / math.sqrt(d), -np.inf)
            p = np.exp(lg - lg.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            oh = p @ vv
            o[bi, :, h] = oh
            do = w[bi, :, h]
            dp = do @ vv.T
            ds = p * (dp - (do * oh).sum(axis=1, keepdims=True))
            dq[bi, :, h] = ds @ kk / math.sqrt(d)
            dk[bi, :, gi] += ds.T @ qq / math.sqrt(d)
            dv[bi, :, gi] += p.T @ do
    return o, (dq, dk, dv)


# ------------------------------------------------------------------------------------------------ inputs

def group_directions(inputs_seed, hkv, g, d):
    rng = np.random.default_rng(1000 + inputs_seed)
    u = np.zeros((hkv, g, d))
    for gi in range(hkv):
        m, _ = np.linalg.qr(rng.standard_normal((d, d)))
        u[gi] = m[:, :g].T
    return u


def make_inputs(seed, b, t, hq, hkv, d, bs, *, strength=None, noise=0.3):
    """q [B,T,Hq,D], k, v [B,T,Hkv,D] float32 (numpy). Block blk of group gi carries relevance alpha[blk, gi, h]
    along head h's own direction u[gi, h]; query head h of group gi points along u[gi, h] (plus noise)."""
    rng = np.random.default_rng(seed)
    g = hq // hkv
    strength = 2.0 * d ** 0.25 if strength is None else strength  # head logits spread over ~ +-4
    u = group_directions(seed, hkv, g, d)
    nb = -(-t // bs)
    alpha = rng.uniform(-1.0, 1.0, size=(b, nb, hkv, g))
    kdir = np.einsum("bnch,chd->bncd", alpha, u)                        # [B, NB, Hkv, D]
    k = noise * rng.standard_normal((b, t, hkv, d)) + strength * kdir[:, np.arange(t) // bs]
    qdir = u.reshape(hq, d)                                             # head h = gi * g + hh
    q = noise * rng.standard_normal((b, t, hq, d)) + strength * qdir[None, None]
    v = rng.standard_normal((b, t, hkv, d))
    return q.astype(np.float32), k.astype(np.float32), v.astype(np.float32)


def prefill_positions(b, t):
    return np.broadcast_to(np.arange(t), (b, t))


def early_rows(pos, cfg: SparseConfig):
    """Queries before the first coarse kernel is complete (t < 4 * kernel_size - 1), as a mask over pos[0]."""
    return pos[0] < 4 * cfg.kernel_size - 1


def discrimination_failures(case, q, k, pos, sels):
    """What would make the tests on these inputs vacuous; [] when the inputs discriminate. Each entry is one way a
    wrong implementation would still pass:
      a wrong group aggregation (head 0 alone, mean of logits, max over heads) selecting the same blocks;
      lse_approx not changing the selection;
      "minicpm4.1" selecting the blocks of "minicpm4" with the same window/topk (cross-check vacuous);
      (case g4nocoarse) dropping the per-head normaliser before the first coarse kernel selecting the same blocks."""
    out = []
    for variant in ("minicpm4", "minicpm4.1"):
        for lse in (False, True):
            cfg = make_cfg(case, variant, lse)
            if case == "g4nocoarse":
                if lse:
                    e = early_rows(pos, cfg)
                    wrong = bf_select(q[:, e], k, pos[:, e], cfg, agg="unnormalised")
                    if (wrong == sels[cfg][:, :, e]).all():
                        out.append(f"unnormalised-early {variant}")
                continue
            for agg in ("head0", "mean_logit", "max"):
                if (bf_select(q, k, pos, cfg, agg=agg) == sels[cfg]).all():
                    out.append(f"{agg} {variant} lse={lse}")
            if (sels[cfg] == sels[make_cfg(case, variant, not lse)]).all():
                out.append(f"lse {variant}")
    if case != "g4nocoarse":
        for lse in (False, True):
            if (sels[make_cfg(case, "minicpm4.1", lse)] == sels[make_cfg(case, "minicpm4", lse)]).all():
                out.append(f"cross-check lse={lse}")
    return out


@functools.lru_cache(maxsize=None)
def case_inputs(case: str):
    """Inputs of `case` whose selection is unambiguous (margin > MARGIN) for both variants, both lse settings and
    the cross-check configs, and that discriminate (see discrimination_failures)."""
    c = CASES[case]
    pos = prefill_positions(c["b"], c["t"])
    bs, w, topk = c["geom"]["block_size"], c["geom"]["window_size"], c["geom"]["topk"]
    cfgs = [make_cfg(case, v, lse) for v in ("minicpm4", "minicpm4.1") for lse in (False, True)]
    cfgs += [make_cfg(case, "minicpm4", lse, window_size=w + bs, topk=topk - 1) for lse in (False, True)
             if topk - 1 > c["geom"]["init_blocks"]]
    for seed in range(c["seed"], c["seed"] + 40):  # c["seed"]: the first good one (saves the search per worker)
        q, k, v = make_inputs(seed, c["b"], c["t"], c["hq"], c["hkv"], c["d"], bs)
        sels, ok = {}, True
        for cfg in cfgs:
            sel, m = bf_select(q, k, pos, cfg, with_margin=True)
            if m <= MARGIN:
                ok = False
                break
            sels[cfg] = sel
        if ok and not discrimination_failures(case, q, k, pos, sels):
            return q, k, v, pos, sels
    raise AssertionError(f"no seed gives an unambiguous, discriminating selection for {case}")


def loss_weights(shape):
    return np.cos(np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * 0.37)


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def out_and_grads(fn, q, k, v, w):
    def loss(q_, k_, v_):
        o = fn(q_, k_, v_)
        return jnp.sum(o.astype(jnp.float32) * w), o
    (_, o), g = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
    return np.asarray(o), [np.asarray(x) for x in g]


# ------------------------------------------------------------------------------------------------ sanity of the test

@pytest.mark.parametrize("case", ["g2i1", "g4i2"])
@pytest.mark.parametrize("variant,lse", VARIANT_LSE)
def test_inputs_make_wrong_group_aggregation_fail(case, variant, lse):
    """The inputs are built so a wrong group aggregation selects other blocks than the formula; also the top-k
    really chooses, the start of the sequence (qb < n) is covered, and lse_approx changes the choice."""
    c = CASES[case]
    q, k, _, pos, sels = case_inputs(case)
    cfg = make_cfg(case, variant, lse)
    want = sels[cfg]
    for agg in ("head0", "mean_logit", "max"):
        wrong = bf_select(q, k, pos, cfg, agg=agg)
        assert (wrong != want).any(), agg
    other = sels[make_cfg(case, variant, not lse)]
    assert (other != want).any(), "lse_approx must change the selection on these inputs"
    n = c["geom"]["window_size"] // c["geom"]["block_size"]
    counts = want.sum(-1)
    qb = pos // c["geom"]["block_size"]
    assert (qb < n).any()
    # some (row, group, query) has fewer blocks than the causally visible ones: the top-k dropped some
    assert (counts < (qb + 1)[:, None, :]).any()


def test_inputs_make_missing_normaliser_fail_before_first_coarse_kernel():
    """Case g4nocoarse: rows where top-k chooses before any coarse kernel is complete, so the documented fallback
    (exact fine normaliser) decides; dropping the per-head normaliser there selects other blocks."""
    case = "g4nocoarse"
    q, k, _, pos, sels = case_inputs(case)
    for variant in ("minicpm4", "minicpm4.1"):
        cfg = make_cfg(case, variant, True)
        early = early_rows(pos, cfg)
        want = sels[cfg][:, :, early]
        wrong = bf_select(q[:, early], k, pos[:, early], cfg, agg="unnormalised")
        assert (wrong != want).any(), variant
        qb = pos[0, early] // cfg.block_size
        assert (want.sum(-1) < (qb + 1)).any(), "top-k must choose before the first coarse kernel"


def test_brute_force_gradients_equal_autodiff_of_dense_masked_attention():
    """The float64 hand-written gradients of bf_attention equal jax.grad of a plain dense masked attention."""
    case = "g2i1"
    q, k, v, pos, sels = case_inputs(case)
    cfg = make_cfg(case, "minicpm4.1", True)
    mask = sels[cfg]
    w = loss_weights(q.shape)
    o_bf, g_bf = bf_attention(q, k, v, pos, mask, cfg.block_size, w)
    bs = cfg.block_size
    g = q.shape[2] // k.shape[2]
    kpos = np.arange(k.shape[1])
    allowed = mask[:, :, :, kpos // bs] & (kpos[None, None, None, :] <= pos[:, None, :, None])  # [B,Hkv,Tq,Tk]
    allowed = jnp.asarray(np.repeat(allowed, g, axis=1))                                          # [B,Hq,Tq,Tk]

    def dense(q_, k_, v_):
        kk, vv = jnp.repeat(k_, g, axis=2), jnp.repeat(v_, g, axis=2)
        lg = jnp.einsum("bthd,bshd->bhts", q_, kk, precision="highest") / math.sqrt(q_.shape[-1])
        p = jax.nn.softmax(jnp.where(allowed, lg, -jnp.inf), axis=-1)
        return jnp.einsum("bhts,bshd->bthd", p, vv, precision="highest")

    o, grads = out_and_grads(dense, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(w, jnp.float32))
    assert rel_err(o, o_bf) < FWD_TOL
    for name, a, b in zip("qkv", grads, g_bf):
        assert rel_err(a, b) < GRAD_TOL, name


# ------------------------------------------------------------------------------------------------ selection

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant,lse", VARIANT_LSE)
def test_select_blocks_matches_brute_force(case, variant, lse):
    q, k, _, pos, sels = case_inputs(case)
    cfg = make_cfg(case, variant, lse)
    want = sels[cfg]
    # all queries (xla: one chunk of 256 >= T), and the last 37 queries at their absolute positions (xla: chunks of
    # 16 queries, the causally staged path)
    for impl, tq, chunk in (("reference", q.shape[1], 256), ("xla", q.shape[1], 256), ("xla", 37, 16)):
        got = np.asarray(select_blocks(jnp.asarray(q[:, -tq:]), jnp.asarray(k), cfg, impl=impl, chunk=chunk))
        bad = np.argwhere(got != want[:, :, -tq:])
        assert bad.size == 0, (impl, tq, chunk, f"{len(bad)} mismatches, first [b, g, t, block] = {bad[:5].tolist()}")


@functools.lru_cache(maxsize=None)
def tie_inputs():
    """Keys that make kernel 15 (keys 60..67, straddling blocks 3 and 4) the best kernel of every head of every
    group by far: blocks 3 and 4 score exactly the same (both take the max of kernel 15) and share one free slot."""
    b, t, hq, hkv, d, bs = 2, 150, 4, 2, 16, 16
    pos = prefill_positions(b, t)
    for seed in range(20):
        q, k, v = make_inputs(seed, b, t, hq, hkv, d, bs, strength=1.0)
        u = group_directions(seed, hkv, hq // hkv, d)           # the query heads' directions
        k[:, 60:68] += 2.5 * u.sum(axis=1)[None, None]          # liked by every head of the group
        if all(bf_select(q, k, pos, tie_cfg(v_, lse), with_margin=True)[1] > MARGIN for v_, lse in
               ((a, l) for a in ("minicpm4", "minicpm4.1") for l in (False, True))):
            return q, k, v, pos
    raise AssertionError("no seed gives unambiguous tie inputs")


def tie_cfg(variant, lse):
    # init 1 + one free slot (+ the 3 forced local blocks for minicpm4.1)
    return make_cfg("g2i1", variant, lse, topk=2 if variant == "minicpm4" else 3)


@pytest.mark.parametrize("variant,lse", VARIANT_LSE)
def test_top_k_ties_break_toward_the_lower_block_index(variant, lse):
    """One free top-k slot and two blocks tied at the top (one straddling kernel is the max of both): the lower
    block index wins, in the brute force and in every selection impl."""
    q, k, _, pos = tie_inputs()
    cfg = tie_cfg(variant, lse)
    want = bf_select(q, k, pos, cfg)
    n_local = 2 if variant == "minicpm4" else 3  # blocks qb-n+1..qb or qb-n..qb are not candidates
    rows = pos[0] // 16 - n_local >= 4           # blocks 3 and 4 are both candidates
    assert rows.any()
    assert want[:, :, rows, 3].all() and not want[:, :, rows, 4].any()
    for impl, chunk in (("reference", 256), ("xla", 48)):
        got = np.asarray(select_blocks(jnp.asarray(q), jnp.asarray(k), cfg, impl=impl, chunk=chunk))
        bad = np.argwhere(got != want)
        assert bad.size == 0, (impl, chunk, f"{len(bad)} mismatches, first [b, g, t, block] = {bad[:5].tolist()}")


# ------------------------------------------------------------------------------------------------ attention

ATTN = {
    "reference": dict(impl="reference"),
    # small chunks/tiles: several attention chunks and top-k tiles at these lengths
    "xla": dict(impl="xla", chunk=32, tile=16),
    "pallas": dict(impl="pallas", interpret=True),
    "pallas_tpu": dict(impl="pallas", interpret=True, pallas_backend="mosaic_tpu"),
}
# reference and xla: every variant x lse x case; Pallas (GPU / TPU kernels, interpret mode is slow): both variants,
# each lse setting once per kernel family, both group sizes
ATTN_PARAMS = [pytest.param(impl, case, v, lse, id=f"{impl}-{case}-{v}-lse{int(lse)}")
               for impl in ("reference", "xla") for case in ("g2i1", "g4i2") for v in ("minicpm4", "minicpm4.1")
               for lse in (False, True)]
# g4nocoarse, where the lse fallback decides: xla with lse (its selection in every setting: test_select_blocks_*)
ATTN_PARAMS += [pytest.param("xla", "g4nocoarse", v, True, id=f"xla-g4nocoarse-{v}-lse1")
                for v in ("minicpm4", "minicpm4.1")]
ATTN_PARAMS += [pytest.param(impl, case, v, lse, id=f"{impl}-{case}-{v}-lse{int(lse)}")
                for impl, case, v, lse in [("pallas", "g2i1", "minicpm4", False),
                                           ("pallas", "g4i2", "minicpm4.1", True),
                                           ("pallas_tpu", "g4i2", "minicpm4", True),
                                           ("pallas_tpu", "g2i1", "minicpm4.1", False)]]

@pytest.mark.parametrize("impl,case,variant,lse", ATTN_PARAMS)
def test_attention_forward_and_grads_match_brute_force(impl, case, variant, lse):
    q, k, v, pos, sels = case_inputs(case)
    cfg = make_cfg(case, variant, lse)
    w = loss_weights(q.shape)
    o_bf, g_bf = bf_attention(q, k, v, pos, sels[cfg], cfg.block_size, w)
    opts = dict(ATTN[impl])
    name = opts.pop("impl")
    fn = lambda q_, k_, v_: infllm_v2_attention(q_, k_, v_, cfg, name, **opts)
    o, grads = out_and_grads(fn, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(w, jnp.float32))
    errs = {"fwd": rel_err(o, o_bf)} | {"d" + n: rel_err(a, b) for n, a, b in zip("qkv", grads, g_bf)}
    print(f"\n{impl} {case} {variant} lse={lse}: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))
    assert errs["fwd"] <= FWD_TOL, errs
    assert max(errs["dq"], errs["dk"], errs["dv"]) <= GRAD_TOL, errs


# ------------------------------------------------------------------------------------------------ decode

DECODE_S = 150
DECODE_LENGTHS = np.array([150, 97, 45, 20, 9])       # 9: no kernel yet; 20: kernels but no coarse kernel
DECODE_AT = (40, 100, 150)                            # decode after this many steps (each row at min(step, length))
DECODE_CASE = {("minicpm4", False): "g2i1", ("minicpm4", True): "g4i2", ("minicpm4.1", False): "g4i2",
               ("minicpm4.1", True): "g2i1"}
DECODE_IMPLS = {"reference": {}, "xla": {}, "pallas": dict(interpret=True, num_splits=2),
                "pallas_tpu": dict(interpret=True, num_splits=2, pallas_backend="mosaic_tpu")}


@functools.lru_cache(maxsize=None)
def decode_inputs(case: str):
    """A cache of DECODE_S keys for 5 rows (keys past a row's length are garbage the decode must ignore) and each
    row's decode query at every DECODE_AT step; unambiguous for both variants and lse settings."""
    c = CASES[case]
    bsz, s = len(DECODE_LENGTHS), DECODE_S
    cfgs = [make_cfg(case, v, lse) for v in ("minicpm4", "minicpm4.1") for lse in (False, True)]
    for seed in range(100, 140):
        q, k, v = make_inputs(seed, bsz, s, c["hq"], c["hkv"], c["d"], c["geom"]["block_size"])
        ok = True
        for step in DECODE_AT:
            lengths = np.minimum(step, DECODE_LENGTHS)
            qd = q[np.arange(bsz), lengths - 1][:, None]
            for cfg in cfgs:
                _, m = bf_select(qd, k, (lengths - 1)[:, None], cfg, with_margin=True)
                ok = ok and m > MARGIN
        if ok:
            return q, k, v
    raise AssertionError(f"no seed gives an unambiguous decode selection for {case}")


def np_cache(k, lengths, ks, st, n_max):
    """Own numpy kernel means per row, zero past the row's count."""
    out = np.zeros((k.shape[0], n_max) + k.shape[2:])
    counts = np.array([max((int(L) - ks) // st + 1, 0) for L in lengths])
    for bi in range(k.shape[0]):
        for j in range(min(counts[bi], n_max)):
            out[bi, j] = np.asarray(k[bi, j * st: j * st + ks], np.float64).mean(0)
    return out, counts


@pytest.mark.parametrize("variant,lse", VARIANT_LSE)
def test_decode_with_incremental_cache_matches_brute_force(variant, lse):
    case = DECODE_CASE[(variant, lse)]
    cfg = make_cfg(case, variant, lse)
    q, k, v = decode_inputs(case)
    bsz, s, hkv, d = k.shape
    kj, vj = jnp.asarray(k), jnp.asarray(v)
    ks, st = cfg.kernel_size, cfg.kernel_stride
    cc = init_compressed_cache(bsz, s, hkv, d, cfg, jnp.float32)
    assert (cc.kc2 is not None) == lse
    step_fn = jax.jit(lambda c_, n_: update_compressed_cache(c_, kj, n_, cfg))
    full_fn = jax.jit(lambda n_: compressed_cache_from_keys(kj, n_, cfg, max_len=s))
    decoders = {impl: jax.jit(functools.partial(infllm_v2_decode, cfg=cfg, impl="pallas" if impl.startswith("pallas")
                                                else impl, **opts))
                for impl, opts in DECODE_IMPLS.items() if impl != "reference"}
    errs = {}
    for step in range(1, s + 1):                       # one token at a time; finished rows keep their length
        lengths = np.minimum(step, DECODE_LENGTHS)
        cc = step_fn(cc, jnp.asarray(lengths, jnp.int32))
        full = full_fn(jnp.asarray(lengths, jnp.int32))
        np.testing.assert_array_equal(np.asarray(cc.count), np.asarray(full.count), err_msg=f"count at {step}")
        np.testing.assert_allclose(np.asarray(cc.kc), np.asarray(full.kc), rtol=1e-6, atol=1e-6,
                                   err_msg=f"kc at {step}")
        mine, counts = np_cache(k, lengths, ks, st, cc.kc.shape[1])
        np.testing.assert_array_equal(np.asarray(cc.count), counts, err_msg=f"count vs numpy at {step}")
        np.testing.assert_allclose(np.asarray(cc.kc), mine, rtol=1e-5, atol=1e-6, err_msg=f"kc vs numpy at {step}")
        if lse:
            np.testing.assert_array_equal(np.asarray(cc.count2), np.asarray(full.count2), err_msg=f"count2 at {step}")
            np.testing.assert_allclose(np.asarray(cc.kc2), np.asarray(full.kc2), rtol=1e-6, atol=1e-6,
                                       err_msg=f"kc2 at {step}")
            mine2, counts2 = np_cache(k, lengths, 4 * ks, 4 * st, cc.kc2.shape[1])
            np.testing.assert_array_equal(np.asarray(cc.count2), counts2, err_msg=f"count2 vs numpy at {step}")
            np.testing.assert_allclose(np.asarray(cc.kc2), mine2, rtol=1e-5, atol=1e-6,
                                       err_msg=f"kc2 vs numpy at {step}")
        if step not in DECODE_AT:
            continue
        pos = (lengths - 1)[:, None]
        qd = q[np.arange(bsz), lengths - 1][:, None]                     # [B, 1, Hq, D]
        mask = bf_select(qd, k, pos, cfg)
        if step == DECODE_S:  # the longest rows have more candidates than top-k slots: the selection chooses
            assert (mask.sum(-1) < (pos // cfg.block_size + 1)[:, None, :]).any()
        o_bf, _ = bf_attention(qd, k, v, pos, mask, cfg.block_size, np.zeros(qd.shape))
        ln = jnp.asarray(lengths, jnp.int32)
        outs = {"reference": infllm_v2_decode(jnp.asarray(qd), kj, vj, ln, None, cfg, "reference")}
        for impl, dec in decoders.items():
            outs[impl] = dec(jnp.asarray(qd), kj, vj, ln, cc)
        for impl, o in outs.items():
            e = rel_err(o, o_bf)
            errs[impl] = max(errs.get(impl, 0.0), e)
            assert e <= FWD_TOL, (impl, step, e)
    print(f"\ndecode {case} {variant} lse={lse}: " + ", ".join(f"{n} {e:.2e}" for n, e in errs.items()))


# ------------------------------------------------------------------------------------------------ cross-check

@pytest.mark.parametrize("case", ["g2i1", "g4i2"])
@pytest.mark.parametrize("lse", [False, True], ids=["lse0", "lse1"])
def test_minicpm41_equals_minicpm4_with_one_more_window_block_and_one_less_topk(case, lse):
    """"minicpm4.1" (window, topk) selects exactly the blocks of "minicpm4" (window + block, topk - 1), in the brute
    force and in every selection impl; and it differs from "minicpm4" (window, topk), so this is not vacuous."""
    q, k, _, pos, sels = case_inputs(case)
    g = CASES[case]["geom"]
    c41 = make_cfg(case, "minicpm4.1", lse)
    c4_wide = make_cfg(case, "minicpm4", lse, window_size=g["window_size"] + g["block_size"], topk=g["topk"] - 1)
    c4_same = make_cfg(case, "minicpm4", lse)
    assert (sels[c41] == sels[c4_wide]).all()
    assert (sels[c41] != sels[c4_same]).any()
    # the impls: "minicpm4.1" and "minicpm4" (same window/topk) equal the brute force in
    # test_select_blocks_matches_brute_force; here the widened "minicpm4" does too, hence equals "minicpm4.1"
    qj, kj = jnp.asarray(q), jnp.asarray(k)
    for impl in ("reference", "xla"):
        assert (np.asarray(select_blocks(qj, kj, c4_wide, impl=impl)) == sels[c41]).all(), impl
