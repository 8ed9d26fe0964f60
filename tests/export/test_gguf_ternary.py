"""Ternary (BitCPM-style QAT) export: TQ1_0/TQ2_0 hold exactly the model's ternary weights; fallbacks are logged."""

import logging

import gguf
import numpy as np
import pytest

from minicpm_jax.export import ternary_export_error
from minicpm_jax.export.gguf import to_gguf
from minicpm_jax.export.gguf_read import read_tensors

from .conftest import compare, jax_logits, llama_logits, make_cfg, make_params, prompt_ids

FP16_EPS = 2.0 ** -11        # relative rounding of the fp16 block scale


@pytest.mark.parametrize("qtype", ["tq1_0", "tq2_0"])
@pytest.mark.parametrize("group", [-1, 256])
def test_tq_stores_the_ternary_weights_losslessly(tokenizer, tmp_path, qtype, group):
    cfg = make_cfg(weight_quant="ternary", quant_group_size=group)
    params = make_params(cfg, seed=4)
    ids = prompt_ids(cfg)
    path = to_gguf(tmp_path / "t.gguf", cfg, params, tokenizer, qtype).path
    err = ternary_export_error(cfg, params, path, ids[None])
    print(f"{qtype} group {group}: max weight rel err {err['max_weight_rel_err']:.3g}, JAX logits QAT model vs "
          f"file weights {err['max_logit_abs_err']:.3g} (max|logit| {err['max_abs_logit']:.3g})")
    assert {t for t, _ in err["weights"].values()} == {qtype.upper()}
    assert err["max_weight_rel_err"] <= FP16_EPS
    assert err["max_logit_abs_err"] <= 1e-3 * err["max_abs_logit"]
    # and llama.cpp on the file is within the quantized tolerance of the QAT model itself (not just of the file)
    p = compare(llama_logits(path, ids), jax_logits(params, cfg, ids))
    print(f"{qtype} group {group}: llama.cpp vs JAX QAT model: {p}")
    assert p.rel <= 2e-2 and p.argmax_agree >= 0.95, p


def test_tq_falls_back_per_tensor_and_logs(tokenizer, tmp_path, caplog):
    """ffn 320: down_proj rows (320) are not a multiple of 256 -> Q8_0 (320 % 32 == 0), still lossless."""
    cfg = make_cfg(intermediate_size=320, weight_quant="ternary")
    params = make_params(cfg, seed=5)
    with caplog.at_level(logging.WARNING, logger="minicpm_jax.export"):
        rep = to_gguf(tmp_path / "t.gguf", cfg, params, tokenizer, "tq2_0")
    assert [n for n, _ in rep.fallbacks] == [f"blk.{i}.ffn_down.weight" for i in range(cfg.num_hidden_layers)]
    assert "row length 320 is not a multiple of 256" in caplog.text and "using Q8_0" in caplog.text
    types = {n: t for n, (_, t) in read_tensors(rep.path).items()}
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.TQ2_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    err = ternary_export_error(cfg, params, rep.path)
    assert err["max_weight_rel_err"] <= FP16_EPS                  # Q8_0 stores ±s exactly as ±127·(s/127)


def test_small_ternary_groups_fall_back_instead_of_losing_45_percent(tokenizer, tmp_path):
    """Groups of 64 have several scales per 256-block; TQ (one scale per block) would be lossy -> Q8_0."""
    cfg = make_cfg(weight_quant="ternary", quant_group_size=64)
    params = make_params(cfg, seed=6)
    rep = to_gguf(tmp_path / "t.gguf", cfg, params, tokenizer, "tq1_0")
    assert rep.type_counts.get("TQ1_0", 0) == 0 and len(rep.fallbacks) == 7 * cfg.num_hidden_layers
    assert "scale group 64" in rep.fallbacks[0][1]
    assert ternary_export_error(cfg, params, rep.path)["max_weight_rel_err"] <= FP16_EPS


def test_full_precision_model_as_tq_warns(tokenizer, tmp_path, caplog):
    cfg = make_cfg()
    with caplog.at_level(logging.WARNING, logger="minicpm_jax.export"):
        to_gguf(tmp_path / "t.gguf", cfg, make_params(cfg), tokenizer, "tq1_0")
    assert "FULL-PRECISION MODEL AS TQ1_0" in caplog.text


def test_ternary_model_exports_its_ternary_values_at_every_qtype(tokenizer, tmp_path):
    """An f32 export of a QAT model is the QAT model (the forward pass runs its ternary weights)."""
    cfg = make_cfg(weight_quant="ternary")
    params = make_params(cfg, seed=7)
    ids = prompt_ids(cfg)
    path = to_gguf(tmp_path / "t.gguf", cfg, params, tokenizer, "f32").path
    w = read_tensors(path)["blk.1.ffn_up.weight"][0]
    row = np.abs(w[0][w[0] != 0])
    assert np.allclose(row, row[0], rtol=1e-6)                     # one magnitude per row: s·{-1, 0, 1}
    p = compare(llama_logits(path, ids), jax_logits(params, cfg, ids))
    assert p.max_abs <= 1e-4, p


@pytest.mark.parametrize("group,expect", [(-1, "TQ2_0"), (64, "Q8_0")])
def test_fake_quantized_checkpoint_is_recognised(tmp_path, group, expect):
    """A BitCPM-style HF checkpoint (ternary values, loaded with weight_quant='none'): TQ where lossless, Q8_0 for
    groups smaller than a TQ block, and no full-precision warning."""
    from minicpm_jax.export import export_hf
    from minicpm_jax.weights import load_weights

    cfg = make_cfg(weight_quant="ternary", quant_group_size=group)
    params = make_params(cfg, seed=13)
    w = load_weights(export_hf(tmp_path / "hf", cfg, params, None))
    cfg2, params2 = w.cfg, w.params
    assert cfg2.weight_quant == "none"
    rep = to_gguf(tmp_path / "t.gguf", cfg2, params2, None, "tq2_0")
    assert rep.type_counts.get(expect) == 7 * cfg.num_hidden_layers
    assert ternary_export_error(cfg, params, rep.path)["max_weight_rel_err"] <= FP16_EPS
