"""Shared test inputs for InfLLM v2: small configs and inputs whose block selection is unambiguous."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.sparse import SparseConfig
from minicpm_jax.sparse.reference import block_scores_reference

# Scaled-down MiniCPM4 geometry (block 64 / kernel 32 / stride 16 / window 32 blocks / topk 64), same ratios
# for the stages that matter (kernel = block/2, stride = block/4) so the 5/4/1 max-pool is exercised. June-2025
# semantics; both variants, against a brute force of their own, are in test_variants.py.
SMALL = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3, dense_len=0,
                     variant="minicpm4")


def planted(seed: int, b: int, t: int, hq: int, hkv: int, d: int, cfg: SparseConfig, *, tq: int | None = None,
            noise: float = 0.3, strength: float = 2.5):
    """q, k, v where every block carries a distinct random 'relevance' along one direction, so block scores are
    well separated (the ranking is decided by the planted values, not by fp rounding)."""
    rng = np.random.default_rng(seed)
    nb = -(-t // cfg.block_size)
    alpha = rng.uniform(-1.0, 1.0, size=(b, nb, hkv)).astype(np.float32)
    u = np.zeros(d, np.float32)
    u[0] = 1.0
    kblk = alpha[:, np.arange(t) // cfg.block_size]                                       # [B, T, Hkv]
    k = noise * rng.standard_normal((b, t, hkv, d)).astype(np.float32) + strength * kblk[..., None] * u
    tq = t if tq is None else tq
    q = noise * rng.standard_normal((b, tq, hq, d)).astype(np.float32) + strength * u
    v = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def selection_margin(q, k, cfg: SparseConfig, q_offset=None) -> float:
    """Smallest relative gap, over all (row, group, query), between the last block top-k keeps and the first it
    drops. inf when no query has more candidates than top-k slots."""
    s = np.asarray(block_scores_reference(q, k, cfg, q_offset=q_offset))            # [B,Hkv,Tq,NB]
    b, hkv, tq, nb = s.shape
    tk = k.shape[1]
    off = tk - tq if q_offset is None else q_offset
    pos = np.broadcast_to(np.asarray(off).reshape(-1, 1), (b, 1)) + np.arange(tq)[None]
    worst = np.inf
    for bi in range(b):
        for ti in range(tq):
            qb = pos[bi, ti] // cfg.block_size
            n_init = min(cfg.init_blocks, qb + 1)
            cand = [j for j in range(min(qb + 1, nb)) if j >= cfg.init_blocks and j <= qb - cfg.local_blocks]
            slots = cfg.topk_slots - n_init
            if len(cand) <= slots:
                continue
            for g in range(hkv):
                vals = np.sort(s[bi, g, ti, cand])[::-1]
                # Blocks whose max is the same straddling kernel tie exactly in every implementation and are
                # broken by index alike; what must be separated are the distinct values around the cut.
                u = np.unique(vals)[::-1]
                p = int(np.nonzero(u == vals[slots - 1])[0][0])
                gaps = [u[p] - u[p + 1]] if vals[slots - 1] != vals[slots] else []
                if vals[slots - 1] == vals[slots]:
                    gaps += [u[p - 1] - u[p]] if p > 0 else []
                    gaps += [u[p] - u[p + 1]] if p + 1 < len(u) else []
                for gap in gaps:
                    worst = min(worst, gap / max(abs(vals[slots - 1]), 1e-30))
    return worst


def unambiguous(b, t, hq, hkv, d, cfg, *, tq=None, min_margin=1e-4, seed=0, q_offset=None):
    """planted() inputs with a checked selection margin (tries a few seeds, deterministically)."""
    for s in range(seed, seed + 20):
        q, k, v = planted(s, b, t, hq, hkv, d, cfg, tq=tq)
        m = selection_margin(q, k, cfg, q_offset=q_offset)
        if m > min_margin:
            return q, k, v
    raise AssertionError("could not build inputs with an unambiguous selection")


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def loss_fn(impl_fn):
    """Scalar loss with a fixed random cotangent direction (so all output entries matter)."""
    def f(q, k, v):
        o = impl_fn(q, k, v)
        w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape) * 0.37)
        return jnp.sum(o.astype(jnp.float32) * w)
    return f


def out_and_grads(impl_fn, q, k, v):
    """(output, (dq, dk, dv)) of loss_fn(impl_fn) in one jitted call (one compile instead of two)."""
    def f(q_, k_, v_):
        o = impl_fn(q_, k_, v_)
        w = jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape) * 0.37)
        return jnp.sum(o.astype(jnp.float32) * w), o
    (_, o), g = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(q, k, v)
    return o, g


def assert_matches(impl_fn, ref_fn, q, k, v, *, fwd_tol=1e-5, grad_tol=1e-4):
    o, g = out_and_grads(impl_fn, q, k, v)
    o_r, g_r = out_and_grads(ref_fn, q, k, v)
    assert rel_err(o, o_r) < fwd_tol, ("forward", rel_err(o, o_r))
    for name, a, b in zip("qkv", g, g_r):
        assert rel_err(a, b) < grad_tol, ("d" + name, rel_err(a, b))
