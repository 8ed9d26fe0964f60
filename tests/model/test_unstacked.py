"""Decoding over split per-layer weights (`minicpm_jax.unstacked`) gives the stacked path's logits, hidden states
and caches: dense and InfLLM v2 (compressed-key cache), ragged rows, several tokens per step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minicpm_jax as mc
from minicpm_jax.decode import decode_step_with_hidden
from minicpm_jax.unstacked import is_split, split_layers

SPARSE = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3, dense_len=96)


@pytest.fixture(scope="module", params=["dense", "sparse"])
def model(request):
    sparse = SPARSE if request.param == "sparse" else None
    cfg = mc.ModelConfig.tiny(num_hidden_layers=2, vocab_size=300, sparse_config=sparse)
    return cfg, mc.init_params(cfg, jax.random.key(5)), request.param


def test_split_layers_holds_each_layer_slice():
    cfg = mc.ModelConfig.tiny(num_hidden_layers=3, vocab_size=300, sparse_config=None)
    params = mc.init_params(cfg, jax.random.key(0))
    split = split_layers(params)
    assert is_split(split) and not is_split(params) and len(split["layers"]) == 3
    w = params["layers"]["mlp"]["up_proj"]["kernel"]
    np.testing.assert_array_equal(split["layers"][2]["mlp"]["up_proj"]["kernel"], w[2])
    assert split_layers(split) is split


def test_split_decode_equals_stacked(model):
    cfg, params, attention = model
    split = jax.jit(split_layers)(params)
    ids = np.random.default_rng(0).integers(3, 300, (2, 110)).astype(np.int32)
    lengths = jnp.asarray([97, 100], jnp.int32)
    outs = []
    for p in (params, split):
        cache = mc.init_cache(cfg, 2, 128, attention=attention)
        logits0, cache = mc.prefill(p, cfg, jnp.asarray(ids[:, :100]), lengths, cache, attention)
        logits1, cache = mc.decode_step(p, cfg, jnp.asarray(ids[:, 100:105]), cache, attention)
        logits2, hidden, cache = decode_step_with_hidden(p, cfg, jnp.asarray(ids[:, 105:106]), cache, attention)
        outs.append((logits0, logits1, logits2, hidden, cache))
    for a, b in zip(outs[0][:4], outs[1][:4]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    ca, cb = outs[0][4], outs[1][4]
    np.testing.assert_array_equal(cb.lengths, ca.lengths)
    n = int(np.asarray(ca.lengths).min())              # slots every row has written (the rest is garbage)
    for x, y in ((ca.k, cb.k), (ca.v, cb.v)):
        np.testing.assert_allclose(np.asarray(y)[:, :, :n], np.asarray(x)[:, :, :n], rtol=1e-5, atol=1e-5)
    if ca.sparse is not None:                          # compressed keys: same counts, same means
        np.testing.assert_array_equal(cb.sparse.count, ca.sparse.count)
        np.testing.assert_allclose(np.asarray(cb.sparse.kc), np.asarray(ca.sparse.kc), rtol=1e-5, atol=1e-5)
