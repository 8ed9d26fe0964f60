"""llama.cpp runs the exported GGUF with the logits of our JAX forward (edge-export.md §7).

Reference: JAX on the file's own dequantized weights (what remains is llama.cpp quantizing activations to the
weight's dot type). Tolerances from the issue: f32 max abs 1e-4; f16 2e-3 x max|logit|; bf16, q8_0, q4_0, tq*
2e-2 x max|logit| with argmax agreement >= 0.95. All cases use GQA (4 query heads, 2 KV heads).
"""

import numpy as np
import pytest

from minicpm_jax.export import llamacpp
from minicpm_jax.export.gguf import to_gguf

from .conftest import N_CTX, compare, file_parity, jax_logits, llama_logits, longrope, make_cfg, make_params, prompt_ids

REL_TOL = {"f16": 2e-3, "bf16": 2e-2, "q8_0": 2e-2, "q4_0": 2e-2, "tq1_0": 2e-2, "tq2_0": 2e-2}


@pytest.fixture(scope="module")
def models():
    out = {}
    for head in ("tied", "untied"):
        cfg = make_cfg(tie_word_embeddings=head == "tied")
        out[head] = (cfg, make_params(cfg, seed=0 if head == "tied" else 1))
    return out


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_f32_matches_jax(models, tokenizer, tmp_path, head):
    cfg, params = models[head]
    ids = prompt_ids(cfg)
    path = to_gguf(tmp_path / "m.gguf", cfg, params, tokenizer, "f32").path
    p = compare(llama_logits(path, ids), jax_logits(params, cfg, ids))   # f32 file = the params themselves
    print(f"f32 {head}: {p}")
    assert p.max_abs <= 1e-4, p
    assert p.argmax_agree == 1.0


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0", "q4_0", "tq1_0", "tq2_0"])
@pytest.mark.parametrize("head", ["tied", "untied"])
def test_quantized_matches_jax_on_dequantized_weights(models, tokenizer, tmp_path, qtype, head):
    cfg, params = models[head]
    if qtype.startswith("tq"):          # a TQ file is meant for a ternary-QAT model (a full-precision one warns)
        cfg = cfg.replace(weight_quant="ternary")
    ids = prompt_ids(cfg)
    path = to_gguf(tmp_path / "m.gguf", cfg, params, tokenizer, qtype).path
    p = file_parity(path, cfg, ids)
    print(f"{qtype} {head}: {p}")
    assert p.rel <= REL_TOL[qtype], p
    assert p.argmax_agree >= 0.95, p


def test_greedy_32_tokens_identical_at_f32(models, tokenizer, tmp_path):
    cfg, params = models["untied"]
    ids = prompt_ids(cfg, 12, seed=3)
    path = to_gguf(tmp_path / "m.gguf", cfg, params, tokenizer, "f32").path
    got = llamacpp.greedy(llamacpp.open_model(path, n_ctx=N_CTX, logits_all=False), ids, 32)
    # JAX greedy with the full forward on a fixed-length buffer (causal: position t sees tokens <= t only), so one
    # compiled shape serves all 32 steps
    buf = np.zeros(len(ids) + 32, np.int32)
    buf[: len(ids)] = ids
    for t in range(len(ids), len(buf)):
        buf[t] = int(jax_logits(params, cfg, buf)[t - 1].argmax())
    assert got == buf[len(ids):].tolist()


@pytest.mark.parametrize("case", ["short", "long"])
def test_longrope_factors(tokenizer, tmp_path, case):
    """short: max_pos == original (4096) > n_ctx, both sides use short_factor.
    long: max_pos 512 > original 128, so HF (and our JAX) use long_factor and scale cos/sin by
    sqrt(1 + ln(512/128)/ln(128)); llama.cpp picks long because n_ctx 256 > original_context_length 128."""
    cfg = make_cfg(max_position_embeddings=4096 if case == "short" else 512)
    cfg = cfg.replace(rope_scaling=longrope(cfg, original=4096 if case == "short" else 128))
    params = make_params(cfg, seed=2)
    ids = prompt_ids(cfg)
    path = to_gguf(tmp_path / "m.gguf", cfg, params, tokenizer, "f32").path
    ref = jax_logits(params, cfg, ids)
    p = compare(llama_logits(path, ids), ref)
    print(f"longrope {case}: {p}")
    assert p.max_abs <= 1e-4, p
    # the factors matter: the same weights without rope_scaling give clearly different logits
    assert np.abs(jax_logits(params, cfg.replace(rope_scaling=None), ids) - ref).max() > 100 * 1e-4


def test_negative_control_without_qk_permutation_fails(models, tokenizer, tmp_path):
    """HF's rotate-half q/k rows written unpermuted: llama.cpp's adjacent-pair rope must give different logits."""
    cfg, params = models["untied"]
    ids = prompt_ids(cfg)
    path = to_gguf(tmp_path / "bad.gguf", cfg, params, tokenizer, "f32", permute_qk=False).path
    p = compare(llama_logits(path, ids), jax_logits(params, cfg, ids))
    print(f"negative control (no q/k permutation): {p}")
    assert p.max_abs > 100 * 1e-4, p       # the f32 check (1e-4) would catch it by orders of magnitude
