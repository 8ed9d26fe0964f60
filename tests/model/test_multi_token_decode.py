"""Several new tokens per cached step (speculative verification, chunked continuation) and rolling a cache back:
dense and InfLLM v2 (both variants), rows of different lengths, each step held to the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minicpm_jax as mc
from minicpm_jax.kv_cache import truncate_cache
from minicpm_jax.sparse import SparseConfig, compressed_cache_from_keys, infllm_v2_decode

# blocks of 16, kernels of 8 with stride 4: a 5-token step can complete two kernels
SPARSE = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3, dense_len=96)


@pytest.fixture(scope="module", params=["minicpm4", "minicpm4.1"])
def model(request):
    cfg = mc.ModelConfig.tiny(num_hidden_layers=2, vocab_size=300,
                              sparse_config={**SPARSE, "variant": request.param})
    return cfg, mc.init_params(cfg, jax.random.key(11))


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def tokens(n, b=2, seed=0):
    return np.random.default_rng(seed).integers(3, 300, (b, n)).astype(np.int32)


def check_compressed_cache(cfg, cache):
    """Counts equal a rebuild from the cached keys; the rows they cover hold the same means."""
    for layer in range(cfg.num_hidden_layers):
        fresh = compressed_cache_from_keys(cache.k[layer], cache.lengths, cfg.sparse_config, cache.capacity)
        np.testing.assert_array_equal(cache.sparse.count[layer], fresh.count)
        for r, n in enumerate(np.asarray(fresh.count)):
            np.testing.assert_allclose(cache.sparse.kc[layer, r, :n], fresh.kc[r, :n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_multi_token_steps_equal_the_full_pass(model, attention):
    cfg, params = model
    full = tokens(130, seed=1)
    lengths = np.array([84, 91], np.int32)
    ref = np.asarray(mc.forward(params, cfg, jnp.asarray(full), attention=attention))
    cache = mc.init_cache(cfg, 2, 144, attention="sparse")
    _, cache = mc.prefill(params, cfg, jnp.asarray(full[:, :96]), jnp.asarray(lengths), cache, attention)
    errs = []
    for step in range(4):                          # 5 tokens a step: crosses kernel (4) and block (16) boundaries
        pos = lengths[:, None] + 5 * step + np.arange(5)[None]
        logits, cache = mc.decode_step(params, cfg, jnp.asarray(np.take_along_axis(full, pos, 1)), cache, attention)
        errs += [rel(logits[r], ref[r, pos[r]]) for r in range(2)]
    assert np.asarray(cache.lengths).tolist() == (lengths + 20).tolist()
    check_compressed_cache(cfg, cache)
    print(f"max relative error, 5-token steps vs full pass ({attention}):", max(errs))
    assert max(errs) < 1e-5


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_rolled_back_tokens_leave_no_trace(model, attention):
    """Append 7 wrong tokens, roll each row back by a different amount, continue with the true tokens: every
    later step equals the full pass over the true sequence, and the compressed keys equal a rebuild."""
    cfg, params = model
    full, wrong = tokens(140, seed=2), tokens(7, seed=3)
    lengths = np.array([86, 97], np.int32)
    ref = np.asarray(mc.forward(params, cfg, jnp.asarray(full), attention=attention))
    cache = mc.init_cache(cfg, 2, 160, attention="sparse")
    _, cache = mc.prefill(params, cfg, jnp.asarray(full[:, :100]), jnp.asarray(lengths), cache, attention)
    _, cache = mc.decode_step(params, cfg, jnp.asarray(wrong), cache, attention)
    keep = np.array([2, 6], np.int32)              # row 0 keeps 2 true tokens' worth of slots, row 1 keeps 6
    # the kept slots must hold the true tokens: write them, then roll back to lengths + keep
    cache = truncate_cache(cache, cfg, jnp.asarray(lengths))
    assert np.asarray(cache.lengths).tolist() == lengths.tolist()
    pos = lengths[:, None] + np.arange(7)[None]
    _, cache = mc.decode_step(params, cfg, jnp.asarray(np.take_along_axis(full, pos, 1)), cache, attention)
    cache = truncate_cache(cache, cfg, jnp.asarray(lengths + keep))
    check_compressed_cache(cfg, cache)
    errs = []
    for step in range(9):
        p = lengths + keep + step
        logits, cache = mc.decode_step(params, cfg, jnp.asarray(full[np.arange(2), p][:, None]), cache, attention)
        errs += [rel(logits[r, 0], ref[r, p[r]]) for r in range(2)]
    check_compressed_cache(cfg, cache)
    print(f"max relative error after rollback ({attention}):", max(errs))
    assert max(errs) < 1e-5


def test_truncate_never_grows_a_row(model):
    cfg, _ = model
    cache = mc.init_cache(cfg, 2, 160, attention="sparse")
    cache = cache.replace(lengths=jnp.array([10, 50], jnp.int32))
    assert np.asarray(truncate_cache(cache, cfg, jnp.array([20, 40])).lengths).tolist() == [10, 40]


@pytest.mark.parametrize("variant", ["minicpm4", "minicpm4.1"])
def test_decode_of_several_queries_agrees_across_impls(variant):
    """infllm_v2_decode with T = 3 queries per row (ragged rows; the heads of a group disagree): xla and pallas
    (interpret) equal the reference, which selects from the raw keys."""
    cfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3,
                       dense_len=-1, variant=variant)
    b, s, hq, hkv, d = 2, 160, 4, 2, 32
    ks = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(ks[0], (b, 3, hq, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32)
    lengths = jnp.array([150, 77], jnp.int32)
    cc = compressed_cache_from_keys(k, lengths, cfg)
    ref = infllm_v2_decode(q, k, v, lengths, None, cfg, "reference")
    for impl in ("xla", "pallas"):
        out = infllm_v2_decode(q, k, v, lengths, cc, cfg, impl, interpret=True if impl == "pallas" else None)
        assert out.shape == (b, 3, hq, d)
        assert rel(out, ref) < 1e-5, impl
