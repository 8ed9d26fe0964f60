"""`minicpm bench sparse`: its byte / FLOP accounting against counts worked out by hand, and one small run of both
variants end to end (the timings themselves are not asserted: they belong to the benchmark, not to a test)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.bench import sparse as bench
from minicpm_jax.sparse import SparseConfig, compressed_cache_from_keys
from minicpm_jax.sparse.decode import decode_block_lists


@pytest.mark.parametrize("t_len,ks,st", [(200, 32, 16), (1000, 32, 16), (1000, 128, 64), (31, 32, 16)])
def test_scored_pairs_counts_visible_kernels(t_len, ks, st):
    # kernel j ends at j*st + ks - 1; a query at t sees it iff that end is <= t
    want = sum(1 for t in range(t_len) for j in range(t_len) if j * st + ks - 1 <= t and j * st + ks <= t_len)
    assert bench.scored_pairs(t_len, ks, st) == want


@pytest.mark.parametrize("variant", ["minicpm4", "minicpm4.1"])
def test_decode_bytes_at_8k(variant):
    """8192 keys, MiniCPM4 sizes: 511 fine kernels (+127 coarse with the 4.1 LSE), and 96 listed blocks per KV head
    in both variants (4: 32 local + 64 top-k slots; 4.1: 33 local + 63)."""
    cfg = SparseConfig(dense_len=-1, variant=variant)
    s, hkv, d = 8192, 2, 128
    k = jax.random.normal(jax.random.key(0), (1, s, hkv, d), jnp.float32)
    q = jax.random.normal(jax.random.key(1), (1, 1, 32, d), jnp.float32)
    lengths = jnp.array([s], jnp.int32)
    cc = compressed_cache_from_keys(k, lengths, cfg)
    lists = decode_block_lists(q, k, lengths, cc, cfg)
    assert np.asarray(lists.count).tolist() == [[[96], [96]]]
    kernels = 511 + (127 if variant == "minicpm4.1" else 0)
    want = kernels * hkv * d * 4 + 2 * (96 * hkv) * 64 * d * 4
    assert bench.decode_bytes(cc, lists, cfg, d, 4) == want


def test_run_reports_both_variants(capsys):
    rows = bench.run(quick=True, decode_lens=[8192], prefill_len=1024)
    out = capsys.readouterr().out
    assert [r["variant"] for r in rows["decode"]] == ["minicpm4", "minicpm4.1"]
    assert [r["variant"] for r in rows["prefill"]] == ["minicpm4", "minicpm4.1"]
    for r in rows["decode"]:
        assert r["t_sparse"] > 0 and r["t_dense"] > 0
        assert 0 < r["byte_ratio"] < 1            # 96 of 128 blocks + the kernels
        assert 0 < r["sparse_bw"] and 0 < r["dense_bw"]
    for r in rows["prefill"]:
        assert r["flop_ratio"] == pytest.approx(1.0, abs=0.1)  # 1024 tokens: every block is attended
    for name in ("minicpm4 ", "minicpm4.1"):
        assert out.count(name) >= 2              # a decode and a prefill row each
