"""WSD schedule and μP learning-rate scaling against hand-computed values."""

import math

import jax
import numpy as np
import optax
import pytest

import minicpm_jax as mc
from minicpm_jax.train.config import OptimConfig
from minicpm_jax.train.optimizer import lr_multipliers, make_optimizer, weight_decay_mask, wsd_schedule


@pytest.mark.parametrize("shape, expected_mid, expected_end", [
    ("linear", 1e-2 * (1 - 0.9 * 0.5), 1e-3),
    ("cosine", 1e-3 + 0.9e-2 * 0.5 * (1 + math.cos(math.pi * 0.5)), 1e-3),
    ("exponential", 1e-2 * 0.1 ** 0.5, 1e-3),
])
def test_wsd_values(shape, expected_mid, expected_end):
    cfg = OptimConfig(peak_lr=1e-2, warmup_steps=10, decay_steps=20, decay_shape=shape, final_lr_ratio=0.1,
                      init_lr_ratio=0.0)
    lr = wsd_schedule(cfg, total_steps=100)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-3)               # linear warmup
    assert float(lr(10)) == pytest.approx(1e-2)              # stable from the end of warmup
    assert float(lr(79)) == pytest.approx(1e-2)              # ... until the decay starts at 100 - 20
    assert float(lr(80)) == pytest.approx(1e-2)
    assert float(lr(90)) == pytest.approx(expected_mid, rel=1e-5)
    assert float(lr(100)) == pytest.approx(expected_end, rel=1e-5)
    assert float(lr(150)) == pytest.approx(expected_end, rel=1e-5)   # stays at the floor


def test_warmup_from_nonzero_init_and_no_decay():
    lr = wsd_schedule(OptimConfig(peak_lr=2e-3, warmup_steps=4, decay_steps=0, init_lr_ratio=0.5), 50)
    assert [round(float(lr(s)), 7) for s in (0, 2, 4, 49)] == [1e-3, 1.5e-3, 2e-3, 2e-3]


def test_mup_multipliers_and_decay_mask():
    cfg = mc.ModelConfig.tiny(hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
                              num_key_value_heads=2, tie_word_embeddings=False, num_hidden_layers=2,
                              sparse_config=None)
    assert cfg.width_mult == 4.0                              # 1024 / dim_model_base 256
    params = mc.abstract_params(cfg)
    mult = lr_multipliers(cfg, params)
    assert mult["layers"]["self_attn"]["q_proj"]["kernel"] == 0.25
    assert mult["layers"]["mlp"]["down_proj"]["kernel"] == 0.25
    assert mult["embed_tokens"] == 1.0 and mult["lm_head"] == 1.0 and mult["norm"]["weight"] == 1.0
    assert mult["layers"]["input_layernorm"]["weight"] == 1.0
    assert lr_multipliers(cfg, params, mup=False)["layers"]["mlp"]["up_proj"]["kernel"] == 1.0
    mask = weight_decay_mask(params)
    assert mask["layers"]["self_attn"]["o_proj"]["kernel"] and not mask["embed_tokens"]
    assert not mask["norm"]["weight"] and not mask["layers"]["post_attention_layernorm"]["weight"]
    assert weight_decay_mask(params, decay_embeddings=True)["lm_head"]


def test_optimizer_update_applies_mup_lr_and_decay_by_hand():
    """One step of our chain equals Adam's first step (sign of the gradient) x lr x multiplier, plus decay."""
    cfg = mc.ModelConfig.tiny(hidden_size=512, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=1, vocab_size=300, sparse_config=None)
    params = mc.init_params(cfg, jax.random.key(0))
    ocfg = OptimConfig(peak_lr=1e-2, warmup_steps=0, decay_steps=0, weight_decay=0.1, clip_grad_norm=0.0, eps=1e-12)
    tx, _ = make_optimizer(ocfg, cfg, params, total_steps=10)
    grads = jax.tree.map(lambda p: np.full(p.shape, 0.5, np.float32), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    m = 1 / cfg.width_mult                                    # 0.5
    q, q_new = params["layers"]["self_attn"]["q_proj"]["kernel"], new["layers"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_allclose(q_new, q - 1e-2 * m * (1.0 + 0.1 * q), rtol=1e-5, atol=1e-8)
    e, e_new = params["embed_tokens"], new["embed_tokens"]
    np.testing.assert_allclose(e_new, e - 1e-2 * 1.0, rtol=1e-5, atol=1e-8)   # full lr, no weight decay


def test_sparse_flop_count_is_bounded_by_the_attended_blocks():
    import dataclasses
    from minicpm_jax import ModelConfig
    from minicpm_jax.train.metrics import matmul_params, train_flops_per_token
    cfg = ModelConfig.tiny()                  # blocks of 16, window 8 blocks, top-k 8: <= 256 keys per query
    L, h, t = cfg.num_hidden_layers, cfg.hidden_size, 2048
    dense = train_flops_per_token(cfg, t)
    assert dense == pytest.approx(6 * matmul_params(cfg) + 12 * L * h * (t + 1) / 2)
    sparse = train_flops_per_token(cfg, t, sparse=True)
    attn_sparse = sparse - 6 * matmul_params(cfg)
    assert 12 * L * h * 256 * 0.9 < attn_sparse < 12 * L * h * 256 + 2 * L * h * t / cfg.sparse_config.kernel_stride
    # top-k covering every block: the attention term is dense again (plus the scoring)
    wide = cfg.replace(sparse_config=dataclasses.replace(cfg.sparse_config, topk=128))
    assert train_flops_per_token(wide, t, sparse=True) > dense
