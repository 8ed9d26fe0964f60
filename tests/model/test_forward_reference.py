"""The JAX forward pass against an independent float64 numpy implementation of HF MiniCPM (tests/model/hf_reference)."""

import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax import ModelConfig, forward
from minicpm_jax.convert.hf import hf_tensors_to_params
from tests.model import hf_reference

TOL = 1e-5  # max |ours - ref| / max |ref|, float32 compute against float64


def small_hf_config(*, kv_heads, tied, rope):
    rng = np.random.default_rng(kv_heads)
    d = 16
    cfg = dict(vocab_size=97, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
               num_key_value_heads=kv_heads, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=64,
               scale_emb=3.5, scale_depth=1.4, dim_model_base=32, tie_word_embeddings=tied, initializer_range=0.1,
               bos_token_id=1, eos_token_id=2, hidden_act="silu", rope_scaling=None)
    if rope in ("short", "long"):
        short = (1.0 + rng.random(d // 2) * 3).round(4).tolist()
        long = (1.0 + rng.random(d // 2) * 30).round(4).tolist()
        # long factors are active when the cached length (max_position_embeddings) exceeds the original length
        orig = 64 if rope == "short" else 32
        cfg["rope_scaling"] = dict(rope_type="longrope", short_factor=short, long_factor=long,
                                   original_max_position_embeddings=orig)
    return cfg


@pytest.mark.parametrize("kv_heads", [8, 4, 1], ids=["group1", "group2", "group8"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("rope", ["plain", "short", "long"])
def test_forward_matches_float64_hf_reference(kv_heads, tied, rope):
    hf_cfg = small_hf_config(kv_heads=kv_heads, tied=tied, rope=rope)
    weights = hf_reference.random_weights(hf_cfg, seed=kv_heads + 10 * tied)
    cfg = ModelConfig.from_hf_dict(hf_cfg)
    if rope == "long":
        assert cfg.max_position_embeddings > cfg.rope_scaling.original_max_position_embeddings
    params = hf_tensors_to_params(cfg, weights)
    ids = np.random.default_rng(0).integers(0, hf_cfg["vocab_size"], size=(2, 24))
    ref = hf_reference.forward(hf_cfg, weights, ids)
    ours = np.asarray(forward(params, cfg, jnp.asarray(ids)), np.float64)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"max relative error {err:.2e}")
    assert err <= TOL, err


def test_rope_beyond_max_position_uses_long_factors_like_hf():
    """HF regrows its RoPE cache past max_position_embeddings; the factor set then switches to long."""
    hf_cfg = small_hf_config(kv_heads=4, tied=True, rope="short")
    hf_cfg["max_position_embeddings"] = 16
    hf_cfg["rope_scaling"]["original_max_position_embeddings"] = 16
    weights = hf_reference.random_weights(hf_cfg, seed=3)
    cfg = ModelConfig.from_hf_dict(hf_cfg)
    ids = np.random.default_rng(1).integers(0, 97, size=(1, 24))   # 24 > 16: long factors
    ref = hf_reference.forward(hf_cfg, weights, ids)
    ours = np.asarray(forward(hf_tensors_to_params(cfg, weights), cfg, jnp.asarray(ids)), np.float64)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= TOL


def test_bf16_compute_with_fp32_params_stays_close():
    hf_cfg = small_hf_config(kv_heads=4, tied=False, rope="short")
    weights = hf_reference.random_weights(hf_cfg, seed=5)
    cfg = ModelConfig.from_hf_dict(hf_cfg, dtype="bfloat16", param_dtype="float32")
    params = hf_tensors_to_params(cfg, weights)
    assert all(x.dtype == jnp.float32 for x in __import__("jax").tree.leaves(params))
    ids = np.random.default_rng(2).integers(0, 97, size=(2, 16))
    ref = hf_reference.forward(hf_cfg, weights, ids)
    ours = np.asarray(forward(params, cfg, jnp.asarray(ids)), np.float64)
    assert ours.dtype == np.float64 and np.isfinite(ours).all()
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert 1e-5 < err < 3e-2, err          # bf16 really is used, and stays within bf16 accuracy
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9
