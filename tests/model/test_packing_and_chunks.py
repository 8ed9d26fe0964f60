"""Packed rows (segment ids, restarting positions) equal each document alone; chunked attention equals unchunked."""

import jax
import jax.numpy as jnp
import numpy as np

import minicpm_jax as mc
from minicpm_jax.attention import dense_attention


def test_packed_documents_equal_each_document_alone():
    cfg = mc.ModelConfig.tiny(num_hidden_layers=2, vocab_size=300, sparse_config=None)
    params = mc.init_params(cfg, jax.random.key(2))
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 300, n) for n in (7, 12, 4)]
    ids = np.concatenate(docs + [np.zeros(9, int)])[None].astype(np.int32)   # 23 tokens + 9 padding
    seg = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)] + [np.zeros(9, int)])[None]
    pos = np.concatenate([np.arange(len(d)) for d in docs] + [np.zeros(9, int)])[None]
    packed = np.asarray(mc.forward(params, cfg, jnp.asarray(ids), jnp.asarray(pos), jnp.asarray(seg)))
    start = 0
    for d in docs:
        alone = np.asarray(mc.forward(params, cfg, jnp.asarray(d[None].astype(np.int32))))[0]
        got = packed[0, start:start + len(d)]
        assert np.abs(got - alone).max() / np.abs(alone).max() < 1e-5
        start += len(d)
    assert np.isfinite(packed).all()                      # padding rows stay finite (no NaN from empty softmax)


def test_chunked_dense_attention_equals_unchunked_forward_and_grad():
    rng = np.random.default_rng(1)
    b, t, hq, hkv, d = 2, 37, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((b, t, hq, d), (b, t, hkv, d), (b, t, hkv, d)))
    slot = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = jnp.asarray((np.arange(t)[None] >= np.array([[0], [15]])).astype(np.int32) + 1)
    f = lambda c: lambda q, k, v: (dense_attention(q, k, v, slot, seg, seg, chunk_size=c) ** 2).sum()
    full, small = f(4096), f(8)
    np.testing.assert_allclose(full(q, k, v), small(q, k, v), rtol=1e-6)
    g_full = jax.grad(full, argnums=(0, 1, 2))(q, k, v)
    g_small = jax.grad(small, argnums=(0, 1, 2))(q, k, v)
    for a, b_ in zip(g_full, g_small):
        np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)


def test_scan_and_unrolled_layers_and_remat_agree():
    base = mc.ModelConfig.tiny(num_hidden_layers=3, vocab_size=200, sparse_config=None)
    params = mc.init_params(base, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 200, (2, 16)), jnp.int32)

    def loss(cfg):
        return jax.value_and_grad(lambda p: jax.nn.logsumexp(mc.forward(p, cfg, ids), -1).mean())(params)

    l0, g0 = loss(base)
    for variant in (base.replace(scan_layers=False), base.replace(remat_policy="full"),
                    base.replace(remat_policy="dots_no_batch", scan_layers=False)):
        l1, g1 = loss(variant)
        np.testing.assert_allclose(l0, l1, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):   # float32 reassociation only
            assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-4 * np.abs(np.asarray(b)).max()
