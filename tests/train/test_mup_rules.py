"""μP rules (`optim.mup_rule`) and standard parametrisation: learning-rate multipliers and init stds against
hand-computed values, and the rule's validation."""

import jax
import numpy as np
import optax
import pytest

import minicpm_jax as mc
from minicpm_jax.sharding import make_mesh
from minicpm_jax.train.config import OptimConfig, load_config
from minicpm_jax.train.mup import lr_multipliers
from minicpm_jax.train.optimizer import make_optimizer
from minicpm_jax.train.step import build_step

# hidden 1024 over dim_model_base 256: width multiplier m = 4, so 1/m = 0.25 and 1/sqrt(m) = 0.5.
WIDE = dict(hidden_size=1024, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=1,
            vocab_size=512, tie_word_embeddings=False, sparse_config=None)
HIDDEN = [("layers", "self_attn", "q_proj", "kernel"), ("layers", "self_attn", "k_proj", "kernel"),
          ("layers", "self_attn", "v_proj", "kernel"), ("layers", "self_attn", "o_proj", "kernel"),
          ("layers", "mlp", "gate_proj", "kernel"), ("layers", "mlp", "up_proj", "kernel"),
          ("layers", "mlp", "down_proj", "kernel")]
EMBED_HEAD = [("embed_tokens",), ("lm_head",)]
NORMS = [("norm", "weight"), ("layers", "input_layernorm", "weight"), ("layers", "post_attention_layernorm", "weight")]

# (parametrisation, model overrides, optim fields) -> hand values (lr multiplier, init std) per tensor group;
# initializer_range is 0.1 (tiny preset).
CASES = {
    "hidden": ({}, dict(mup=True, mup_rule="hidden"),
               {"hidden": (0.25, 0.05), "embed_head": (1.0, 0.1), "norm": (1.0, None)}),
    "every_2d": ({}, dict(mup=True, mup_rule="every_2d"),
                 {"hidden": (0.25, 0.05), "embed_head": (0.25, 0.05), "norm": (1.0, None)}),
    "sp": (dict(dim_model_base=1024.0), dict(mup=False),
           {"hidden": (1.0, 0.1), "embed_head": (1.0, 0.1), "norm": (1.0, None)}),
}


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


@pytest.mark.parametrize("name", list(CASES))
def test_lr_multipliers_and_init_stds_by_hand(name):
    over, optim, want = CASES[name]
    cfg = mc.ModelConfig.tiny(**WIDE, **over)
    ocfg = OptimConfig(warmup_steps=0, decay_steps=0, **optim)
    mult = lr_multipliers(cfg, mc.abstract_params(cfg), ocfg.mup, ocfg.mup_rule)
    setup = build_step(cfg, make_mesh({"data": 1, "fsdp": -1, "tensor": 1}), (len(jax.devices()), 8), optim=ocfg)
    params = setup.init_params(0)                      # what training starts from: model init x the rule's factors
    for group, paths in (("hidden", HIDDEN), ("embed_head", EMBED_HEAD), ("norm", NORMS)):
        lr, std = want[group]
        for path in paths:
            assert _get(mult, path) == lr, (name, path)
            x = np.asarray(_get(params, path))
            if std is None:
                np.testing.assert_array_equal(x, 1.0)
            else:
                assert np.std(x) == pytest.approx(std, rel=0.03), (name, path)


def test_every_2d_moves_the_embedding_at_the_scaled_rate():
    """Adam's first step is lr x sign(grad): the embedding moves by peak_lr / m under every_2d, peak_lr under hidden."""
    cfg = mc.ModelConfig.tiny(hidden_size=512, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=1, vocab_size=300, sparse_config=None)      # m = 2
    params = mc.init_params(cfg, jax.random.key(0))
    grads = jax.tree.map(lambda p: np.full(p.shape, 0.5, np.float32), params)
    for rule, step in (("hidden", 1e-2), ("every_2d", 0.5e-2)):
        ocfg = OptimConfig(peak_lr=1e-2, warmup_steps=0, decay_steps=0, clip_grad_norm=0.0, eps=1e-12, mup_rule=rule)
        tx, _ = make_optimizer(ocfg, cfg, params, total_steps=10)
        new = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
        np.testing.assert_allclose(new["embed_tokens"], params["embed_tokens"] - step, rtol=1e-5, atol=1e-8)
        q, q_new = params["layers"]["self_attn"]["q_proj"]["kernel"], new["layers"]["self_attn"]["q_proj"]["kernel"]
        np.testing.assert_allclose(q_new, q - 0.5e-2 * (1.0 + 0.1 * q), rtol=1e-5, atol=1e-8)   # weight decay 0.1


def test_mup_rule_is_validated_by_name():
    with pytest.raises(ValueError, match="optim.mup_rule.*hidden.*every_2d.*'all'"):
        OptimConfig(mup_rule="all")
    with pytest.raises(ValueError, match="optim.mup_rule"):
        load_config(None, ["optim.mup_rule=embeddings"])
    exp = load_config(None, ["optim.mup_rule=every_2d", "optim.mup=false", "model.hidden_size=512",
                             "model.num_attention_heads=8", "model.dim_model_base=${model.hidden_size}"])
    assert exp.optim.mup_rule == "every_2d" and exp.model_config().width_mult == 1.0   # SP in one line of overrides
