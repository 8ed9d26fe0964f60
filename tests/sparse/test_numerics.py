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


def test_topk_logits_far_above_the_window_take_the_rescaled_pass():
    """Block 3 (a top-k pick of later queries) scores ~170 against a window max < 10: exp(s - window max) overflows
    fp32, so the XLA path must redo its top-k pass with the shift raised (_topk_fwd's lax.cond branch)."""
    from sparse_helpers import SMALL, assert_matches, planted
    q, k, v = planted(0, 1, 160, 4, 2, 16, SMALL)
    u = jnp.zeros(16).at[0].set(1.0)
    k, q = k.at[:, 48:64].add(60 * u), q + 8 * u
    ref = lambda *a: infllm_v2_attention(*a, SMALL, "reference")
    xla = lambda *a: infllm_v2_attention(*a, SMALL, "xla")
    assert_matches(xla, ref, q, k, v, fwd_tol=1e-4)   # logits ~170: fp32 rounding of the logits ~1e-5
