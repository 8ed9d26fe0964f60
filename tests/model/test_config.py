"""ModelConfig: HF config.json round trip (unknown keys kept), presets, and validation messages naming the field."""

import dataclasses
import json

import pytest

from minicpm_jax import ModelConfig, SparseConfig
from minicpm_jax.sparse import config as sparse_config_module

MINICPM4_8B_JSON = {
    "architectures": ["MiniCPMForCausalLM"], "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMConfig"},
    "model_type": "minicpm", "bos_token_id": 1, "eos_token_id": [2, 73440], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.1, "intermediate_size": 16384, "max_position_embeddings": 32768,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_scaling": {"rope_type": "longrope", "long_factor": [1.0 + i / 10 for i in range(64)],
                     "short_factor": [1.0 + i / 10 for i in range(64)], "original_max_position_embeddings": 32768},
    "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": True, "vocab_size": 73448,
    "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4, "mup_denominator": 32, "tie_word_embeddings": False,
    "sparse_config": {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                      "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192},
}


def test_hf_dict_round_trip_keeps_unknown_keys():
    cfg = ModelConfig.from_hf_dict(MINICPM4_8B_JSON)
    assert cfg.extra["mup_denominator"] == 32 and cfg.extra["auto_map"]["AutoConfig"]
    assert cfg.sparse_config == SparseConfig()
    assert cfg.eos_ids == (2, 73440) and cfg.head_dim == 128 and cfg.num_groups == 16
    out = cfg.to_hf_dict()
    # the variant the config loaded as is written out, so a reload (here or by another reader) runs the same function
    assert out["sparse_config"].pop("variant") == "minicpm4.1" and out["sparse_config"].pop("lse_approx") is True
    for k, v in MINICPM4_8B_JSON.items():
        assert json.loads(json.dumps(out[k])) == v, k
    out = cfg.to_hf_dict()
    assert ModelConfig.from_hf_dict(out) == cfg
    assert hash(cfg) == hash(ModelConfig.from_hf_dict(out))     # usable as a jit static argument


def test_sparse_variant_round_trips_and_an_unnamed_one_loads_as_minicpm4_1(caplog, monkeypatch):
    base = MINICPM4_8B_JSON["sparse_config"]
    monkeypatch.setattr(sparse_config_module, "_said_default", False)
    with caplog.at_level("WARNING", logger="minicpm_jax.sparse.config"):
        assert SparseConfig.from_hf_dict(base).variant == "minicpm4.1"
        assert SparseConfig.from_hf_dict(base).lse_approx is True
    said = [r.getMessage() for r in caplog.records if "names no InfLLM v2 variant" in r.getMessage()]
    assert len(said) == 1 and "'minicpm4'" in said[0]                      # once, and how to choose the other
    june = SparseConfig.from_hf_dict({**base, "variant": "minicpm4"})
    assert june.variant == "minicpm4" and june.lse_approx is False          # the variant's own default
    assert SparseConfig.from_hf_dict(june.to_hf_dict()) == june
    assert SparseConfig.from_hf_dict({**base, "variant": "minicpm4", "lse_approx": True}).lse_approx is True
    cfg = ModelConfig.minicpm4_8b().replace(sparse_config={"variant": "minicpm4"})
    assert cfg.sparse_config.lse_approx is False and cfg.sparse_config.topk == 64   # other keys kept
    with pytest.raises(ValueError, match="variant must be one of"):
        SparseConfig.from_hf_dict({**base, "variant": "minicpm5"})


def test_missing_keys_take_hf_defaults():
    cfg = ModelConfig.from_hf_dict({"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
                                    "num_hidden_layers": 2, "vocab_size": 100})
    assert cfg.num_key_value_heads == 4 and cfg.rms_norm_eps == 1e-6 and cfg.tie_word_embeddings is True
    assert cfg.scale_emb == 1.0 and cfg.rope_scaling is None and cfg.sparse_config is None


def test_presets_have_the_published_shapes():
    small, big = ModelConfig.minicpm4_0_5b(), ModelConfig.minicpm4_8b()
    assert (small.hidden_size, small.num_hidden_layers, small.num_groups, small.head_dim) == (1024, 24, 8, 64)
    assert (big.hidden_size, big.num_hidden_layers, big.num_groups, big.head_dim) == (4096, 32, 16, 128)
    assert 0.42e9 < small.param_count() < 0.45e9          # ≈ 0.43B tied (spec §1.1)
    assert 8.1e9 < big.param_count() < 8.3e9              # ≈ 8.19B untied
    assert small.residual_scale == pytest.approx(1.4 / 24 ** 0.5) and big.width_mult == 16
    assert ModelConfig.tiny().param_count() < 10e6


@pytest.mark.parametrize("change, field", [
    (dict(num_attention_heads=5), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(scale_emb=-1.0), "scale_emb"),
    (dict(eos_token_id=999999), "eos_token_id"),
    (dict(dtype="float8"), "dtype"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 3}),
     "rope_scaling"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (dict(sparse_config={"block_size": 64, "kernel_stride": 24}), "sparse_config"),
    (dict(sparse_config={"window_size": 100}), "sparse_config"),
    (dict(sparse_config={"topk": 1, "init_blocks": 1}), "sparse_config"),
])
def test_invalid_values_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        ModelConfig.tiny().replace(**change)


def test_from_hf_dict_rejects_bad_head_split():
    with pytest.raises(ValueError, match="num_attention_heads"):
        ModelConfig.from_hf_dict({"hidden_size": 100, "num_attention_heads": 3})


def test_a_partial_sparse_config_override_keeps_the_other_fields():
    # model.sparse_config.topk=4 on the tiny preset must keep its 16-token blocks and 1024-token dense_len (a sweep
    # over top-k once silently ran the 8B defaults, whose 2048-token window made every point dense)
    tiny = ModelConfig.tiny()
    cfg = tiny.replace(sparse_config={"topk": 4})
    assert cfg.sparse_config == dataclasses.replace(tiny.sparse_config, topk=4)
    from minicpm_jax.train.config import load_config
    exp = load_config("experiments/configs/long_context_sparse_tiny.yaml", ["model.sparse_config.topk=4"])
    assert exp.model_config().sparse_config == cfg.sparse_config
    # a config without one takes the dict as a whole (unnamed fields: SparseConfig's defaults)
    half = ModelConfig.minicpm4_0_5b().replace(sparse_config={"topk": 16})
    assert half.sparse_config.topk == 16 and half.sparse_config.block_size == 64
