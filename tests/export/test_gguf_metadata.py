"""What the GGUF says about itself, read back with gguf.GGUFReader; atomic writes."""

import math

import gguf
import numpy as np
import pytest

from minicpm_jax.export.gguf import to_gguf
from minicpm_jax.export.gguf_read import read_tensors

from .conftest import longrope, make_cfg, make_params

T = gguf.GGMLQuantizationType


def _fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


def test_hyperparameters_mup_keys_and_tensor_types(tokenizer, tmp_path):
    cfg = make_cfg(tie_word_embeddings=False, max_position_embeddings=512)
    cfg = cfg.replace(rope_scaling=longrope(cfg, original=128))
    path = to_gguf(tmp_path / "m.gguf", cfg, make_params(cfg), tokenizer, "q8_0", name="tiny-test").path
    kv, tensors = _fields(path)
    assert kv["general.architecture"] == "minicpm" and kv["general.name"] == "tiny-test"
    assert kv["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    expect = {"minicpm.context_length": 512, "minicpm.embedding_length": 256, "minicpm.block_count": 2,
              "minicpm.feed_forward_length": 512, "minicpm.attention.head_count": 4,
              "minicpm.attention.head_count_kv": 2, "minicpm.rope.dimension_count": 64, "minicpm.vocab_size": 2048,
              "minicpm.rope.scaling.type": "longrope", "minicpm.rope.scaling.original_context_length": 128}
    for k, v in expect.items():
        assert kv[k] == v, k
    approx = {"minicpm.embedding_scale": cfg.scale_emb, "minicpm.residual_scale": 1.4 / math.sqrt(2),
              "minicpm.logit_scale": 256 / 64, "minicpm.attention.layer_norm_rms_epsilon": cfg.rms_norm_eps,
              "minicpm.rope.freq_base": 10000.0,
              "minicpm.rope.scaling.attn_factor": math.sqrt(1 + math.log(512 / 128) / math.log(128))}
    for k, v in approx.items():
        assert kv[k] == pytest.approx(v, rel=1e-6), k
    # vocabulary: SentencePiece as llama.cpp's "llama" model, one token per embedding row
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.pre"] == "default"
    assert len(kv["tokenizer.ggml.tokens"]) == len(kv["tokenizer.ggml.scores"]) == cfg.vocab_size
    assert tensors["token_embd.weight"].shape.tolist() == [256, cfg.vocab_size]          # ggml order: {in, rows}
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert kv["tokenizer.ggml.eot_token_id"] == tokenizer.im_end_id
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_space_prefix"] is False
    assert kv["tokenizer.chat_template"] == tokenizer.chat_template
    # tensor types: matrices and embeddings Q8_0, 1-D and rope factors F32; untied head present
    assert tensors["output.weight"].tensor_type == T.Q8_0
    assert tensors["blk.1.ffn_down.weight"].tensor_type == T.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == T.F32
    stored = read_tensors(path)
    # max_position_embeddings > original: HF always uses the long factors, so both slots hold them
    np.testing.assert_array_equal(stored["rope_factors_long.weight"][0], np.float32(cfg.rope_scaling.long_factor))
    np.testing.assert_array_equal(stored["rope_factors_short.weight"][0], np.float32(cfg.rope_scaling.long_factor))
    assert len(tensors) == 2 + 9 * 2 + 2 + 1


def test_tied_head_writes_no_output_tensor_and_short_factors_are_kept(tokenizer, tmp_path):
    cfg = make_cfg()
    cfg = cfg.replace(rope_scaling=longrope(cfg, original=4096))
    path = to_gguf(tmp_path / "m.gguf", cfg, make_params(cfg), tokenizer, "f16").path
    kv, tensors = _fields(path)
    assert "output.weight" not in tensors
    assert "minicpm.rope.scaling.attn_factor" not in kv          # max_pos == original: HF's multiplier is 1
    assert tensors["token_embd.weight"].tensor_type == T.F16
    short = read_tensors(path)["rope_factors_short.weight"][0]
    np.testing.assert_array_equal(short, np.float32(cfg.rope_scaling.short_factor))


def test_no_tokenizer_writes_no_vocab(tmp_path):
    cfg = make_cfg()
    path = to_gguf(tmp_path / "m.gguf", cfg, make_params(cfg), None, "f32").path
    kv, _ = _fields(path)
    assert kv["tokenizer.ggml.model"] == "no_vocab" and kv["minicpm.vocab_size"] == cfg.vocab_size


def test_write_is_atomic(tokenizer, tmp_path, monkeypatch):
    """A failing export leaves the previous good file untouched and no temporary file behind."""
    cfg = make_cfg()
    params = make_params(cfg)
    out = tmp_path / "m.gguf"
    to_gguf(out, cfg, params, tokenizer, "f16")
    good = out.read_bytes()

    import minicpm_jax.export.gguf as writer

    calls = {"n": 0}
    real = writer.gguf_array

    def fail_midway(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(writer, "gguf_array", fail_midway)
    with pytest.raises(RuntimeError, match="simulated"):
        to_gguf(out, cfg, params, tokenizer, "q8_0")
    assert out.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_unknown_qtype_is_an_error(tmp_path):
    cfg = make_cfg()
    with pytest.raises(ValueError, match="unknown GGUF qtype 'q3_0'"):
        to_gguf(tmp_path / "m.gguf", cfg, make_params(cfg), None, "q3_0")
