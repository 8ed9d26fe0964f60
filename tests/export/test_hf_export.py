"""HF safetensors export: MiniCPM's published format, read back bit-exact by load_hf."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minicpm_jax as mc
from minicpm_jax.export import export_hf
from minicpm_jax.export.hf_export import REMOTE_CODE_FILES

from .conftest import jax_logits, longrope, make_cfg, make_params, prompt_ids


def _assert_bit_exact(a, b):
    for (pa, x), (pb, y) in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)):
        assert pa == pb
        assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(pa)


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_bit_exact_with_tokenizer_and_published_config(tokenizer, tmp_path, tied):
    cfg = make_cfg(tie_word_embeddings=tied, eos_token_id=(2, 4))
    cfg = cfg.replace(rope_scaling=longrope(cfg, original=4096))
    params = make_params(cfg, seed=9)
    out = export_hf(tmp_path / "hf", cfg, params, tokenizer)
    cfg2, params2 = mc.load_hf(out, dtype=jnp.float32)
    assert cfg2.to_hf_dict() == {**cfg.to_hf_dict(), **{k: v for k, v in cfg2.extra.items()}}
    _assert_bit_exact(params, params2)

    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["MiniCPMForCausalLM"] and hf["model_type"] == "minicpm"
    assert hf["auto_map"]["AutoModelForCausalLM"] == "modeling_minicpm.MiniCPMForCausalLM"
    assert hf["auto_map"]["AutoConfig"] == "configuration_minicpm.MiniCPMConfig"
    for k in ("scale_emb", "scale_depth", "dim_model_base", "rope_scaling", "tie_word_embeddings", "vocab_size",
              "num_key_value_heads", "rms_norm_eps", "torch_dtype", "eos_token_id"):
        assert k in hf, k
    assert hf["eos_token_id"] == [2, 4] and hf["tie_word_embeddings"] is tied
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= files
    assert ("lm_head.weight" in json.dumps(_safetensors_names(out))) is not tied
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == tokenizer.chat_template

    from data_pipeline.tokenizer import Tokenizer

    text = "<|im_start|>user\n中文 😀  12345<|im_end|>"
    assert Tokenizer.load(out).encode(text) == tokenizer.encode(text)


def _safetensors_names(path):
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", framework="np") as f:
        return list(f.keys())


def test_bf16_export(tmp_path):
    cfg = make_cfg()
    params = make_params(cfg, seed=10)
    out = export_hf(tmp_path / "hf", cfg, params, None, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, p16 = mc.load_hf(out, dtype=jnp.bfloat16)
    _assert_bit_exact(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params), p16)


def test_ternary_model_exports_fake_quantized_weights(tmp_path):
    """BitCPM4's format: the ternary values in a plain checkpoint, so any MiniCPM loader runs the QAT model."""
    cfg = make_cfg(weight_quant="ternary", quant_group_size=256)
    params = make_params(cfg, seed=11)
    out = export_hf(tmp_path / "hf", cfg, params, None)
    cfg2, params2 = mc.load_hf(out, dtype=jnp.float32)
    assert cfg2.weight_quant == "none"
    up = np.asarray(params2["layers"]["mlp"]["up_proj"]["kernel"][0])        # [in, out]
    for col in (0, 7):
        for g in range(up.shape[0] // 256):
            mags = np.unique(np.abs(up[g * 256:(g + 1) * 256, col]))
            assert len(mags[mags > 0]) == 1                                   # s·{-1, 0, 1} per group
    ids = prompt_ids(cfg)
    np.testing.assert_allclose(jax_logits(params2, cfg2, ids), jax_logits(params, cfg, ids), atol=2e-5)


def test_remote_code_files_are_copied_when_given(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in REMOTE_CODE_FILES:
        (src / f).write_text(f"# stand-in for OpenBMB's {f}\n")
    cfg = make_cfg()
    out = export_hf(tmp_path / "hf", cfg, make_params(cfg), None, remote_code_dir=src)
    assert all((out / f).read_text().startswith("# stand-in") for f in REMOTE_CODE_FILES)
    out2 = export_hf(tmp_path / "hf2", cfg, make_params(cfg), None, remote_code_dir=tmp_path / "nothing-here")
    assert not any((out2 / f).exists() for f in REMOTE_CODE_FILES)
