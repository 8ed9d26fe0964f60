"""The model's InfLLM v2 path: the dense_len switch, sparse == dense when every block is attended, training
gradients through the sparse path, and cached sparse decoding (incremental compressed keys) vs the full pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minicpm_jax as mc

SPARSE = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3, dense_len=96)


@pytest.fixture(scope="module")
def model():
    cfg = mc.ModelConfig.tiny(num_hidden_layers=2, vocab_size=300, sparse_config=SPARSE)
    return cfg, mc.init_params(cfg, jax.random.key(7))


def ids_of(n, b=1, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, 300, (b, n)), jnp.int32)


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_dense_len_switch_boundary(model):
    cfg, params = model
    below, at = ids_of(95), ids_of(96)
    assert rel(mc.forward(params, cfg, below), mc.forward(params, cfg, below, attention="dense")) == 0.0
    auto = mc.forward(params, cfg, at)
    assert rel(auto, mc.forward(params, cfg, at, attention="sparse")) == 0.0
    assert rel(auto, mc.forward(params, cfg, at, attention="dense")) > 1e-4   # the switch changes the result


def test_sparse_equals_dense_when_every_block_is_attended(model):
    cfg, params = model
    wide = cfg.replace(sparse_config={**SPARSE, "topk": 64})           # top-k + window cover all blocks
    x = ids_of(160, b=2)
    assert rel(mc.forward(params, wide, x, attention="sparse"), mc.forward(params, wide, x, attention="dense")) < 1e-5


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_sparse_impls_match_reference_in_the_model_forward_and_grads(model, impl):
    cfg, params = model
    x = ids_of(128, seed=3)
    loss = lambda c: jax.value_and_grad(lambda p: jax.nn.logsumexp(mc.forward(p, c, x, attention="sparse")).mean())
    l_ref, g_ref = loss(cfg.replace(sparse_impl="reference"))(params)
    l_imp, g_imp = loss(cfg.replace(sparse_impl=impl))(params)
    assert float(l_imp) == pytest.approx(float(l_ref), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g_imp), jax.tree.leaves(g_ref)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4 * np.abs(np.asarray(b)).max()


def test_sparse_decode_equals_sparse_full_pass_with_ragged_rows(model):
    """With attention='sparse' everywhere, each cached decode step equals the full forward over the same prefix,
    and the incremental compressed-key cache equals a rebuild from the cached keys."""
    cfg, params = model
    full = np.asarray(ids_of(130, b=2, seed=5))
    lengths = np.array([84, 90], np.int32)
    # selection is causal (a query sees only complete past kernels), so one full pass gives every prefix's logits
    ref = np.asarray(mc.forward(params, cfg, jnp.asarray(full), attention="sparse"))
    cache = mc.init_cache(cfg, 2, 144, attention="sparse")
    logits, cache = mc.prefill(params, cfg, jnp.asarray(full[:, :96]), jnp.asarray(lengths), cache, "sparse")
    errs = [rel(logits[r], ref[r, lengths[r] - 1]) for r in range(2)]
    for step in range(20):                      # crosses several kernel (4) and block (16) boundaries
        pos = lengths + step
        logits, cache = mc.decode_step(params, cfg, jnp.asarray(full[np.arange(2), pos][:, None]), cache, "sparse")
        errs += [rel(logits[r, 0], ref[r, pos[r]]) for r in range(2)]
    from minicpm_jax.sparse import compressed_cache_from_keys
    for layer in range(cfg.num_hidden_layers):
        fresh = compressed_cache_from_keys(cache.k[layer], cache.lengths, cfg.sparse_config, cache.capacity)
        np.testing.assert_array_equal(cache.sparse.count[layer], fresh.count)
        np.testing.assert_allclose(cache.sparse.kc[layer], fresh.kc, rtol=1e-5, atol=1e-6)
    print("max relative error sparse decode vs full pass:", max(errs))
    assert max(errs) < 1e-5


def test_auto_decode_switches_per_row_at_dense_len(model):
    """HF decides per step by the KV length: a row below dense_len decodes dense, a row at or above it sparse."""
    cfg, params = model
    full = np.asarray(ids_of(100, b=2, seed=9))
    lengths = np.array([80, 95], np.int32)            # after one token: 81 (< 96, dense) and 96 (sparse)
    outs = {}
    for attention in ("auto", "dense", "sparse"):
        cache = mc.init_cache(cfg, 2, 112, attention="auto")
        _, cache = mc.prefill(params, cfg, jnp.asarray(full[:, :96]), jnp.asarray(lengths), cache, "dense")
        tok = full[np.arange(2), lengths][:, None]
        outs[attention], _ = mc.decode_step(params, cfg, jnp.asarray(tok), cache, attention)
    np.testing.assert_allclose(outs["auto"][0], outs["dense"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs["auto"][1], outs["sparse"][1], rtol=1e-5, atol=1e-5)
    assert rel(outs["dense"][1], outs["sparse"][1]) > 1e-4


def test_packed_rows_are_rejected_on_the_sparse_path(model):
    cfg, params = model
    from minicpm_jax.attention_plan import check_one_document_per_row
    seg = np.ones((2, 96), np.int32)
    check_one_document_per_row(seg)
    seg[1, 50:] = 2
    with pytest.raises(ValueError, match="one document per row"):
        check_one_document_per_row(seg)
    with pytest.raises(ValueError, match="one document per row"):
        mc.forward(params, cfg, ids_of(96), segment_ids=jnp.asarray(seg[:1]), attention="sparse")
