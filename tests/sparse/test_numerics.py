"""Numerical edge cases of the sparse implementations (found in a trained model: first-block tokens whose every
logit is far below zero made the XLA path's online softmax divide 0 by 0)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.sparse import SparseConfig, infllm_v2_attention

CFG = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3, dense_len=64)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_very_negative_logits_stay_finite_and_exact(impl):
    t, d = 80, 16
    rng = np.random.default_rng(0)
    k = jnp.asarray(10 + rng.random((1, t, 1, d)), jnp.float32)          # every q.k is about -800 / sqrt(d) * ...
    q = jnp.asarray(-(10 + rng.random((1, t, 2, d))), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, t, 1, d)), jnp.float32)
    ref = infllm_v2_attention(q, k, v, CFG, impl="reference")
    out = infllm_v2_attention(q, k, v, CFG, impl=impl)
    assert np.isfinite(np.asarray(ref)).all()
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, ref, rtol=5e-4, atol=5e-4)   # logits ~ -800: float32 rounding ~1e-4
    g = jax.grad(lambda q: infllm_v2_attention(q, k, v, CFG, impl=impl).sum())(q)
    g_ref = jax.grad(lambda q: infllm_v2_attention(q, k, v, CFG, impl="reference").sum())(q)
    assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_allclose(g, g_ref, rtol=5e-3, atol=5e-4)
