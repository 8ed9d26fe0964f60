"""Q4_K_M through llama.cpp's own quantizer (gguf-py cannot write K-quants)."""

import numpy as np

from minicpm_jax.export.gguf import to_gguf

from .conftest import compare, file_parity, jax_logits, llama_logits, make_cfg, make_params, prompt_ids


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_q4_k_m_runs_close_to_the_model(tokenizer, tmp_path):
    """ffn 320: ffn_down rows are not a multiple of 256, so llama.cpp falls back for them (reported)."""
    cfg = make_cfg(intermediate_size=320)
    params = make_params(cfg, seed=8)
    ids = prompt_ids(cfg)
    rep = to_gguf(tmp_path / "m.gguf", cfg, params, tokenizer, "q4_k_m")
    assert rep.type_counts.get("Q4_K", 0) >= 8 and "Q6_K" in rep.type_counts
    assert [name for name, _ in rep.fallbacks] == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    assert not any(p.name.startswith(".m.gguf") for p in tmp_path.iterdir())     # no F32 intermediate left
    # exact check against the file's own dequantized weights (gguf-py dequantizes K-quants)
    p = file_parity(rep.path, cfg, ids)
    print(f"q4_k_m vs JAX on dequantized weights: {p}")
    assert p.rel <= 2e-2 and p.argmax_agree >= 0.95, p
    # looser check against the unquantized model: real 4-bit noise, judged by top-1 agreement and KL
    got, ref = llama_logits(rep.path, ids), jax_logits(params, cfg, ids)
    kl = (np.exp(_log_softmax(ref)) * (_log_softmax(ref) - _log_softmax(got))).sum(-1)
    q = compare(got, ref)
    print(f"q4_k_m vs the f32 model: {q}, KL mean {kl.mean():.3g} max {kl.max():.3g}")
    assert q.argmax_agree >= 0.9 and kl.mean() <= 5e-3, (q, kl.mean())
