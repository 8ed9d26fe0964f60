"""The reference against the spec text (numpy brute force), and the properties every implementation must keep."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.sparse import SparseConfig, infllm_v2_attention, select_blocks
from minicpm_jax.sparse.reference import dense_causal_reference
from sparse_helpers import SMALL, planted, rel_err


def brute_force_selection(q, k, cfg: SparseConfig):
    """The issue's definition, literally, with numpy loops: bool [B, Hkv, Tq, NB] (queries = last Tq keys)."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    b_, tq, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    bs, ks, st, n = cfg.block_size, cfg.kernel_size, cfg.kernel_stride, cfg.window_blocks
    nk = max((tk - ks) // st + 1, 0)
    nb = -(-tk // bs)
    out = np.zeros((b_, hkv, tq, nb), bool)
    for b in range(b_):
        kc = np.stack([k[b, j * st:j * st + ks].mean(0) for j in range(nk)]) if nk else np.zeros((0, hkv, d))
        for i in range(tq):
            t = tk - tq + i
            qb = t // bs
            vis = [j for j in range(nk) if j * st + ks - 1 <= t]
            for gi in range(hkv):
                score = np.zeros(nk)
                for h in range(gi * g, (gi + 1) * g):
                    if vis:
                        lg = np.array([q[b, i, h] @ kc[j, gi] / math.sqrt(d) for j in vis])
                        p = np.exp(lg - lg.max())
                        score[vis] += p / p.sum()
                blk = np.zeros(nb)
                for bb in range(nb):
                    inter = [j for j in vis if j * st < (bb + 1) * bs and j * st + ks > bb * bs]
                    blk[bb] = max([score[j] for j in inter], default=0.0)
                window = set(range(max(qb - n + 1, 0), qb + 1))
                init = [bb for bb in range(min(cfg.init_blocks, qb + 1))]
                cand = [bb for bb in range(qb + 1) if bb not in window and bb not in init]
                slots = cfg.topk - len(init)
                top = sorted(cand, key=lambda bb: (-blk[bb], bb))[:slots]
                for bb in set(init) | set(top) | window:
                    out[b, gi, i, bb] = True
    return out


@pytest.mark.parametrize("hq,hkv", [(2, 1), (4, 2)])
def test_reference_selection_matches_spec_brute_force(hq, hkv):
    cfg = SMALL
    q, k, _ = planted(3, 1, 120, hq, hkv, 8, cfg, tq=40)
    want = brute_force_selection(q, k, cfg)
    got = np.asarray(select_blocks(q, k, cfg, impl="reference"))
    assert (got == want).all()
    got_x = np.asarray(select_blocks(q, k, cfg, impl="xla"))
    assert (got_x == want).all()


def test_topk_counts_init_blocks_and_window_is_separate():
    cfg = SMALL
    q, k, _ = planted(0, 1, 160, 2, 1, 8, cfg)
    sel = np.asarray(select_blocks(q, k, cfg, impl="reference"))[0, 0]  # [T, NB]
    for t in range(160):
        qb = t // 16
        n_past = qb + 1
        expect = min(n_past, 3 + 2)  # init + 2 top-k picks + 2 window blocks
        assert sel[t].sum() == expect, (t, sel[t])
        assert sel[t, 0] and sel[t, qb] and (qb == 0 or sel[t, qb - 1])
        assert not sel[t, qb + 1:].any()


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
@pytest.mark.parametrize("hq,hkv", [(1, 1), (4, 2), (8, 1), (16, 1)])
def test_sparse_equals_dense_when_everything_is_covered(impl, hq, hkv):
    # topk + window cover all 7 blocks of 100 tokens: InfLLM v2 must be exactly causal attention.
    cfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=64, topk=4,
                       dense_len=0)
    t = 100 if impl != "pallas" else 40
    ks = jax.random.split(jax.random.key(hq * 10 + hkv), 3)
    q = jax.random.normal(ks[0], (1, t, hq, 16))
    k = jax.random.normal(ks[1], (1, t, hkv, 16))
    v = jax.random.normal(ks[2], (1, t, hkv, 16))
    out = infllm_v2_attention(q, k, v, cfg, impl)
    assert rel_err(out, dense_causal_reference(q, k, v)) < 2e-5


def test_queries_are_the_last_positions_and_q_offset():
    q, k, v = planted(1, 2, 130, 4, 2, 8, SMALL)
    full = infllm_v2_attention(q, k, v, SMALL, "reference")
    tail = infllm_v2_attention(q[:, -37:], k, v, SMALL, "reference")
    assert rel_err(tail, full[:, -37:]) < 1e-6
    mid = infllm_v2_attention(q[:, 50:70], k, v, SMALL, "reference", q_offset=50)
    assert rel_err(mid, full[:, 50:70]) < 1e-6
    mid_x = infllm_v2_attention(q[:, 50:70], k, v, SMALL, "xla", q_offset=50)
    assert rel_err(mid_x, full[:, 50:70]) < 1e-5


def test_dense_len_switch_boundary():
    cfg = SparseConfig(dense_len=8192)
    assert not cfg.use_sparse(8191)
    assert cfg.use_sparse(8192)
    assert SparseConfig(dense_len=-1).use_sparse(1)
    # below dense_len + what the sparse set covers, the sparse path equals dense anyway
    small = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, window_size=32, topk=3, dense_len=64)
    assert not small.use_sparse(63) and small.use_sparse(64)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(kernel_size=24, kernel_stride=16), "multiple of kernel_stride"),
    (dict(block_size=40), "block_size"),
    (dict(window_size=100), "window_size"),
    (dict(topk=1, init_blocks=1), "topk"),
    (dict(kernel_size=8, kernel_stride=16), "kernel_size"),
])
def test_incompatible_sizes_are_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SparseConfig(**kwargs)


def test_packed_segment_ids_are_rejected():
    q, k, v = planted(0, 2, 40, 2, 1, 8, SMALL)
    seg = np.ones((2, 40), np.int32)
    out = infllm_v2_attention(q, k, v, SMALL, "xla", segment_ids=seg)  # one document per row: fine
    assert out.shape == q.shape
    seg[0, 20:] = 2
    with pytest.raises(ValueError, match="one document per row"):
        infllm_v2_attention(q, k, v, SMALL, "xla", segment_ids=seg)
    with pytest.raises(ValueError, match="one document per row"):
        jax.jit(lambda s: infllm_v2_attention(q, k, v, SMALL, "xla", segment_ids=s))(seg)


def test_bad_shapes_are_errors():
    q, k, v = planted(0, 1, 40, 3, 2, 8, SMALL)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        infllm_v2_attention(q, k, v, SMALL, "xla")
    with pytest.raises(ValueError, match="impl"):
        infllm_v2_attention(q[:, :, :2], k, v, SMALL, "cuda")
