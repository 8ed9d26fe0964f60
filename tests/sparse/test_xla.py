"""XLA path (chunked selection, init+window band and key-block-major top-k tiles) against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.sparse import SparseConfig, infllm_v2_attention, select_blocks
from sparse_helpers import SMALL, assert_matches, rel_err, unambiguous

GROUPS = [(2, 2), (4, 2), (8, 1), (16, 1)]  # group sizes 1, 2, 8, 16


@pytest.mark.parametrize("hq,hkv", GROUPS)
def test_xla_forward_and_grads_match_reference(hq, hkv):
    # 150 tokens: not a multiple of the block (16), kernel (8) or chunk size
    q, k, v = unambiguous(1, 150, hq, hkv, 16, SMALL)
    assert (np.asarray(select_blocks(q, k, SMALL)) == np.asarray(select_blocks(q, k, SMALL, impl="reference"))).all()
    ref = lambda q_, k_, v_: infllm_v2_attention(q_, k_, v_, SMALL, "reference")
    xla = lambda q_, k_, v_: infllm_v2_attention(q_, k_, v_, SMALL, "xla", chunk=24)
    assert_matches(xla, ref, q, k, v)


@pytest.mark.parametrize("tile,span", [(1, 7), (3, 32), (128, 2048)])
def test_xla_topk_tiling_does_not_change_the_result(tile, span):
    # tile 1: one (query, block) pair per step; tile 3 / span 7, 32: blocks split over tiles, queries over ranges
    # (span 7 does not divide 150, so the last range is padded)
    q, k, v = unambiguous(2, 150, 4, 2, 16, SMALL)
    ref = lambda q_, k_, v_: infllm_v2_attention(q_, k_, v_, SMALL, "reference")
    xla = lambda q_, k_, v_: infllm_v2_attention(q_, k_, v_, SMALL, "xla", chunk=16, tile=tile, span=span)
    assert_matches(xla, ref, q, k, v)


def test_xla_batch_rows_and_partial_query_chunk():
    q, k, v = unambiguous(2, 97, 4, 2, 8, SMALL, tq=41)
    ref = infllm_v2_attention(q, k, v, SMALL, "reference")
    for chunk in (1, 16, 64):
        assert rel_err(infllm_v2_attention(q, k, v, SMALL, "xla", chunk=chunk), ref) < 1e-5


def test_xla_init_blocks_and_window_variants():
    cfg = SparseConfig(block_size=16, kernel_size=16, kernel_stride=8, init_blocks=2, window_size=16, topk=4,
                       dense_len=0)
    q, k, v = unambiguous(1, 170, 4, 2, 8, cfg)
    ref = infllm_v2_attention(q, k, v, cfg, "reference")
    assert rel_err(infllm_v2_attention(q, k, v, cfg, "xla", chunk=32), ref) < 1e-5


def test_xla_lse_approx_matches_reference():
    cfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, window_size=32, topk=3, dense_len=0,
                       lse_approx=True)
    q, k, v = unambiguous(1, 200, 4, 2, 8, cfg)
    assert (np.asarray(select_blocks(q, k, cfg)) == np.asarray(select_blocks(q, k, cfg, impl="reference"))).all()
    ref = infllm_v2_attention(q, k, v, cfg, "reference")
    assert rel_err(infllm_v2_attention(q, k, v, cfg, "xla"), ref) < 1e-5


def test_use_nope_scores_with_the_given_tensors():
    cfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, window_size=32, topk=3, dense_len=0,
                       use_nope=True)
    qs, ks, _ = unambiguous(1, 150, 4, 2, 8, cfg, seed=5)
    q, k, v = unambiguous(1, 150, 4, 2, 8, cfg, seed=11)
    ref = infllm_v2_attention(q, k, v, cfg, "reference", q_score=qs, k_score=ks)
    xla = infllm_v2_attention(q, k, v, cfg, "xla", q_score=qs, k_score=ks)
    assert rel_err(xla, ref) < 1e-5
    # the selection really came from (qs, ks): scoring with (q, k) attends different blocks
    assert not (np.asarray(select_blocks(qs, ks, cfg)) == np.asarray(select_blocks(q, k, cfg))).all()


def test_real_minicpm4_sizes_short_sequence():
    # block 64 / kernel 32 / stride 16 / init 1 / window 2048 / topk 64; 6600 keys, the last 96 queries
    cfg = SparseConfig()
    q, k, v = unambiguous(1, 6600, 2, 1, 16, cfg, tq=96)
    sel = np.asarray(select_blocks(q, k, cfg))
    assert (sel == np.asarray(select_blocks(q, k, cfg, impl="reference"))).all()
    assert sel.sum(-1).max() == 96 and sel.shape[-1] == 104  # 1 init + 63 top-k + 32 window of 104 blocks
    ref = lambda q_, k_, v_: infllm_v2_attention(q_, k_, v_, cfg, "reference")
    xla = lambda q_, k_, v_: infllm_v2_attention(q_, k_, v_, cfg, "xla")
    assert_matches(xla, ref, q, k, v)


def test_xla_bf16_inputs_accumulate_in_fp32():
    q, k, v = unambiguous(1, 120, 4, 2, 16, SMALL)
    ref = infllm_v2_attention(q, k, v, SMALL, "reference")
    out = infllm_v2_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), SMALL, "xla")
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), ref) < 3e-2


@pytest.mark.parametrize("t,tq", [(3, 3), (17, 5)])
def test_sequences_shorter_than_a_kernel_or_block(t, tq):
    from sparse_helpers import planted
    q, k, v = planted(0, 2, t, 4, 2, 16, SMALL, tq=tq)
    ref = infllm_v2_attention(q, k, v, SMALL, "reference")
    for impl in ("xla", "pallas"):
        assert rel_err(infllm_v2_attention(q, k, v, SMALL, impl, interpret=True), ref) < 1e-5, impl
