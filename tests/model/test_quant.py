"""Ternary QAT: codes in {-1,0,1} x per-group scale, straight-through gradients, model runs quantised."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minicpm_jax as mc
from minicpm_jax.quant import ternary_codes, ternary_fake_quant


def test_fake_quant_values_and_straight_through_gradient():
    w = jax.random.normal(jax.random.key(0), (512, 3, 4)) * 0.05       # kernel [in, heads, dim]
    q = ternary_fake_quant(w, in_dims=1, group_size=256)
    codes, scale = ternary_codes(w, in_dims=1, group_size=256)
    assert set(np.unique(np.asarray(codes))) <= {-1, 0, 1}
    assert scale.shape == (2, 12)
    recon = (codes.reshape(2, 256, 12).astype(jnp.float32) * scale[:, None]).reshape(w.shape)
    np.testing.assert_allclose(q, recon, rtol=1e-6)
    for g in range(2):                                                    # scale = mean |w| of the group
        np.testing.assert_allclose(scale[g], np.abs(np.asarray(w).reshape(2, 256, 12)[g]).mean(0), rtol=1e-5)
    g = jax.grad(lambda w: (ternary_fake_quant(w, 1, 256) * 3.0).sum())(w)
    np.testing.assert_allclose(g, 3.0)                                    # STE: identity gradient


def test_group_must_divide_input():
    with pytest.raises(ValueError, match="does not divide"):
        ternary_fake_quant(jnp.ones((300, 4)), 1, 256)


def test_model_forward_uses_ternary_weights():
    cfg = mc.ModelConfig.tiny(num_hidden_layers=2, vocab_size=256, sparse_config=None)
    params = mc.init_params(cfg, jax.random.key(0))
    qcfg = cfg.replace(weight_quant="ternary")
    ids = jnp.arange(32, dtype=jnp.int32).reshape(2, 16)
    full, tern = mc.forward(params, cfg, ids), mc.forward(params, qcfg, ids)
    assert not np.allclose(full, tern)
    # the same forward with weights replaced by their ternary values (hidden matrices only) matches exactly
    def quantise(path, x):
        name = jax.tree_util.keystr(path)
        if "kernel" not in name:
            return x
        n_in = 2 if "o_proj" in name else 1
        return jax.vmap(lambda k: ternary_fake_quant(k, n_in, -1))(x)
    qparams = jax.tree_util.tree_map_with_path(quantise, params)
    np.testing.assert_allclose(mc.forward(qparams, cfg, ids), tern, rtol=1e-5, atol=1e-5)
