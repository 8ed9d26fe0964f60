"""Decode: the incrementally kept compressed-key cache equals recomputing it, and sparse decode equals the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.sparse import (SparseConfig, compressed_cache_from_keys, infllm_v2_attention, infllm_v2_decode,
                                init_compressed_cache, update_compressed_cache)
from minicpm_jax.sparse.compress import compress_keys, num_kernels
from sparse_helpers import SMALL, planted, rel_err, unambiguous


@pytest.mark.parametrize("lse_approx", [False, True])
def test_incremental_cache_equals_recomputed(lse_approx):
    cfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, window_size=32, topk=3, dense_len=0,
                       lse_approx=lse_approx)
    b, s, hkv, d = 2, 80, 2, 8
    k = jax.random.normal(jax.random.key(0), (b, s, hkv, d))
    prompt = jnp.array([5, 33])                       # rows of different lengths
    cc = compressed_cache_from_keys(k, prompt, cfg, max_len=s)
    step = jax.jit(lambda c, n: update_compressed_cache(c, k, n, cfg))
    lengths = prompt
    for _ in range(s - 33):                           # one new key per row per step
        lengths = lengths + 1
        cc = step(cc, lengths)
        full = compressed_cache_from_keys(k, lengths, cfg, max_len=s)
        assert (np.asarray(cc.count) == np.asarray(full.count)).all()
        np.testing.assert_allclose(np.asarray(cc.kc), np.asarray(full.kc), rtol=1e-6, atol=1e-6)
        if lse_approx:
            assert (np.asarray(cc.count2) == np.asarray(full.count2)).all()
            np.testing.assert_allclose(np.asarray(cc.kc2), np.asarray(full.kc2), rtol=1e-6, atol=1e-6)
    assert int(cc.count[1]) == num_kernels(80, 8, 4)


def test_cache_from_empty_and_kernel_means():
    cfg = SMALL
    k = jax.random.normal(jax.random.key(1), (1, 40, 1, 4))
    cc = init_compressed_cache(1, 40, 1, 4, cfg, jnp.float32)
    for n in range(1, 41):
        cc = update_compressed_cache(cc, k, jnp.array([n]), cfg)
    assert int(cc.count[0]) == num_kernels(40, 8, 4) == 9
    want = np.stack([np.asarray(k[0, 4 * j:4 * j + 8]).mean(0) for j in range(9)])
    np.testing.assert_allclose(np.asarray(cc.kc[0, :9]), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(compress_keys(k, 8, 4)[0]), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_decode_matches_reference_rows_of_different_lengths(impl):
    cfg = SMALL
    s = 150
    q, k, v = unambiguous(3, s, 8, 2, 16, cfg, seed=4)
    lengths = jnp.array([150, 101, 9])
    qd = q[jnp.arange(3), lengths - 1][:, None]      # each row's query at its last position
    cc = compressed_cache_from_keys(k, lengths, cfg)
    ref = infllm_v2_decode(qd, k, v, lengths, None, cfg, "reference")
    out = infllm_v2_decode(qd, k, v, lengths, cc, cfg, impl, interpret=True, num_splits=2)
    assert rel_err(out, ref) < 1e-5
    # and the reference decode equals the last prefill row (same function, one query)
    full = infllm_v2_attention(q[:1], k[:1], v[:1], cfg, "reference")
    assert rel_err(ref[:1, 0], full[:, -1]) < 1e-5


def test_decode_real_sizes_with_incremental_cache():
    cfg = SparseConfig(window_size=256, topk=8)       # block 64 / kernel 32 / stride 16, window 4 blocks
    s = 1200
    q, k, v = planted(9, 1, s, 4, 2, 16, cfg)
    cc = compressed_cache_from_keys(k, jnp.array([1000]), cfg, max_len=s)
    step = jax.jit(lambda c, m: update_compressed_cache(c, k, m, cfg))
    for n in range(1001, s + 1):
        cc = step(cc, jnp.array([n]))
        if n in (1100, 1200):
            qd = q[:, n - 1:n]
            ref = infllm_v2_decode(qd, k, v, jnp.array([n]), None, cfg, "reference")
            out = infllm_v2_decode(qd, k, v, jnp.array([n]), cc, cfg, "xla")
            assert rel_err(out, ref) < 1e-5
