"""`minicpm export`, `minicpm bench edge` and `generate --gguf` through their argparse entry points; checkpoint
sources."""


import numpy as np
import pytest

import minicpm_jax as mc
from minicpm_jax.cli import main as minicpm
from minicpm_jax.export import llamacpp
from minicpm_jax.export.llamacpp import generate_text
from minicpm_jax.weights import load_weights

from .conftest import compare, jax_logits, llama_logits, make_cfg, make_params, prompt_ids


def _cli(argv):
    return minicpm(argv)


def load_for_export(path):
    w = load_weights(path)
    return w.cfg, w.params, w.tokenizer


def generate_with_gguf(path, prompt, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, chat):
    return generate_text(path, prompt=prompt, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, chat=chat)


@pytest.fixture(scope="module")
def hf_checkpoint(tokenizer, tmp_path_factory):
    """An HF checkpoint directory with its tokenizer, as a training run or an import would leave it."""
    cfg = make_cfg(tie_word_embeddings=False)
    params = make_params(cfg, seed=12)
    d = tmp_path_factory.mktemp("ckpt") / "tiny-minicpm"
    mc.save_hf(d, cfg, params)
    tokenizer.save(d)
    return d, cfg, params


def test_export_gguf_from_hf_dir(hf_checkpoint, tokenizer, tmp_path, capsys):
    d, cfg, params = hf_checkpoint
    out = tmp_path / "m-f32.gguf"
    assert _cli(["export", "--checkpoint", str(d), "--format", "gguf", "--qtype", "f32", "--out", str(out)]) == 0
    assert "exported GGUF" in capsys.readouterr().out
    ids = prompt_ids(cfg)
    assert compare(llama_logits(out, ids), jax_logits(params, cfg, ids)).max_abs <= 1e-4
    llm = llamacpp.open_model(out, logits_all=False)
    assert llm.metadata["general.name"] == "tiny-minicpm"
    assert llamacpp.tokenize(llm, "héllo 中文") == tokenizer.encode("héllo 中文")     # tokenizer came along


def test_export_hf_from_hf_dir_and_flag_errors(hf_checkpoint, tmp_path, capsys):
    d, cfg, params = hf_checkpoint
    out = tmp_path / "hf"
    assert _cli(["export", "--checkpoint", str(d), "--format", "hf", "--out", str(out), "--dtype", "float32"]) == 0
    cfg2, params2, tok2 = load_for_export(out)
    assert cfg2.to_hf_dict()["hidden_size"] == cfg.hidden_size and tok2 is not None
    np.testing.assert_array_equal(np.asarray(params2["lm_head"]), np.asarray(params["lm_head"]))
    capsys.readouterr()
    assert _cli(["export", "--checkpoint", str(d), "--format", "hf", "--qtype", "q8_0", "--out",
                 str(tmp_path / "x")]) == 2
    assert "--qtype applies to --format gguf" in capsys.readouterr().err


def test_tokenizer_flag_for_checkpoints_without_one(tokenizer, tmp_path):
    cfg = make_cfg()
    d = tmp_path / "bare"
    mc.save_hf(d, cfg, make_params(cfg))
    tok_dir = tokenizer.save(tmp_path / "tok")
    out = tmp_path / "m.gguf"
    _cli(["export", "--checkpoint", str(d), "--qtype", "q8_0", "--tokenizer", str(tok_dir / "tokenizer.model"),
          "--out", str(out)])
    llm = llamacpp.open_model(out, logits_all=False)
    assert llm.metadata["tokenizer.ggml.model"] == "llama" and llm.metadata["general.file_type"] == "7"


def test_generate_with_gguf(hf_checkpoint, tokenizer, tmp_path):
    d, cfg, params = hf_checkpoint
    out = tmp_path / "m.gguf"
    _cli(["export", "--checkpoint", str(d), "--qtype", "f16", "--out", str(out)])
    ids = [tokenizer.bos_id] + tokenizer.encode("The history of")
    llm = llamacpp.open_model(out, logits_all=False)
    greedy = llamacpp.greedy(llm, ids, 8)          # a random model may pick [PAD] rows: detokenize in llama.cpp
    text = generate_with_gguf(str(out), None, ids, 8, 0.0, 0, 1.0, 0, False)
    assert text == llm.detokenize(greedy).decode("utf-8", errors="ignore")
    sampled = generate_with_gguf(str(out), "The history of", None, 8, 0.8, 40, 0.95, 1, False)
    assert isinstance(sampled, str) and sampled == generate_with_gguf(str(out), "The history of", None, 8, 0.8, 40,
                                                                      0.95, 1, False)        # seeded
    assert isinstance(generate_with_gguf(str(out), "hi", None, 4, 0.0, 0, 1.0, 0, True), str)   # chat template
    with pytest.raises(ValueError, match="exactly one"):
        generate_with_gguf(str(out), "a", [1], 4, 0.0, 0, 1.0, 0, False)


def test_missing_or_non_run_checkpoints_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_for_export(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither an HF checkpoint directory"):
        load_for_export(tmp_path / "empty")


def test_bench_edge_runs(capsys):
    """The benchmark's code path on the tiny preset (the real run uses the 0.5B shape)."""
    assert _cli(["bench", "edge", "--preset", "tiny", "--qtypes", "q8_0", "--prompt-len", "16",
                 "--decode-tokens", "4", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "| q8_0" in out and "JAX" in out and "decode" in out
