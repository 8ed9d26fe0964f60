"""Tokenizer: round trips, Llama-style training flags, specials, ChatML template and assistant mask, save/load."""

from __future__ import annotations

import json

import pytest

from data_pipeline.tokenizer import (BYTE, CHATML_TEMPLATE, CONTROL, IM_END, IM_START, NORMAL, UNKNOWN, USER_DEFINED,
                                     Tokenizer, train_sentencepiece)

ROUND_TRIP = [
    "The quick brown fox jumps over the lazy dog.",
    "人民日报：中国经济继续保持平稳较快增长，全年国内生产总值增长百分之八。",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tprint(f(12345678901))\n",
    "emoji 😀👍🏽 👩‍👩‍👧 🇨🇳 ✓ and math ∑∫√ and ﬁ ligature",
    "  leading, trailing  ", "many     spaces\n\n\n\nand\t\ttabs\r\nCRLF", " ", "\n", "",
    "mixed 中文 English 日本語 한국어 Ελληνικά Русский",
    "<|im_start|>user\nliteral markers in text<|im_end|>\n",
]

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "谢谢！那德国呢？"},
    {"role": "assistant", "content": "德国的首都是柏林。"},
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_identity(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_round_trip_on_corpus_documents(tokenizer, corpus_dir):
    from data_pipeline.corpus import iter_docs

    docs = [d["text"] for d in iter_docs(corpus_dir)][::10]
    assert len(docs) > 50
    bad = [d[:80] for d in docs if tokenizer.decode(tokenizer.encode(d)) != d]
    assert not bad


def test_trained_llama_style(tokenizer):
    proto = tokenizer._b.proto
    n, t = proto.normalizer_spec, proto.trainer_spec
    assert n.name == "identity" and not n.remove_extra_whitespaces and not n.add_dummy_prefix
    assert t.byte_fallback and t.split_digits and t.allow_whitespace_only_pieces and t.model_type == 2  # BPE
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert (tokenizer.im_start_id, tokenizer.im_end_id) == (3, 4)
    assert tokenizer._b.normalizer_warning() is None


def test_digits_split_and_byte_fallback(tokenizer):
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("2024")]
    assert pieces == ["2", "0", "2", "4"]
    ids = tokenizer.encode("\U0001F9EC")  # a rare emoji: bytes, no <unk>
    assert tokenizer.unk_id not in ids and all(tokenizer.pieces()[i][2] == BYTE for i in ids)


def test_pieces_types_for_gguf(tokenizer):
    p = tokenizer.pieces()
    assert len(p) == tokenizer.vocab_size
    assert p[0] == ("<unk>", 0.0, UNKNOWN) and p[1][2] == CONTROL and p[2][2] == CONTROL
    assert p[3] == (IM_START, 0.0, USER_DEFINED) and p[4] == (IM_END, 0.0, USER_DEFINED)
    assert sum(1 for x in p if x[2] == BYTE) == 256
    normal = [s for _, s, t in p if t == NORMAL]
    assert normal == sorted(normal, reverse=True)  # BPE merge order: falling scores
    assert tokenizer.add_dummy_prefix is False


def test_special_markers_always_parsed_controls_only_on_request(tokenizer):
    assert tokenizer.encode("a<|im_end|>b")[1] == tokenizer.im_end_id
    assert tokenizer.bos_id not in tokenizer.encode("<s>x</s>")
    assert tokenizer.encode("<s>x</s>", parse_special=True)[::2] == [tokenizer.bos_id, tokenizer.eos_id]
    assert tokenizer.encode("x<unk>", parse_special=True)[-1] == tokenizer.unk_id
    assert tokenizer.encode("hi", add_bos=True, add_eos=True)[::len(tokenizer.encode("hi")) + 1] == [1, 2]


def test_chat_template_matches_jinja_and_ids(tokenizer):
    import jinja2

    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    ref = jinja2.Template(CHATML_TEMPLATE).render(messages=MESSAGES, add_generation_prompt=True, bos_token="<s>")
    assert text == ref
    assert text.startswith("<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("德国的首都是柏林。<|im_end|>\n<|im_start|>assistant\n")
    ids, mask = tokenizer.encode_chat(MESSAGES, add_generation_prompt=True)
    assert ids == tokenizer.encode(text, parse_special=True)
    assert ids[0] == tokenizer.bos_id and len(mask) == len(ids)


def test_assistant_mask_covers_replies_and_their_im_end_only(tokenizer):
    ids, mask = tokenizer.encode_chat(MESSAGES)
    target = [i for i, m in zip(ids, mask) if m]
    # the masked tokens are exactly the two replies, each followed by its <|im_end|>
    want = (tokenizer.encode("Paris is the capital of France.") + [tokenizer.im_end_id]
            + tokenizer.encode("德国的首都是柏林。") + [tokenizer.im_end_id])
    assert target == want
    # nothing of the system/user turns, no role headers, no newline after <|im_end|>
    assert mask[ids.index(tokenizer.im_end_id)] == 0  # the system turn's <|im_end|>
    assert sum(mask[i] for i, t in enumerate(ids) if t == tokenizer.im_start_id) == 0


def test_bad_messages_are_rejected(tokenizer):
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        tokenizer.encode_chat([{"role": "user", "content": "x"}, {"role": "assistant"}])


def test_save_and_load_sentencepiece_and_hf_json(tokenizer, tmp_path):
    d = tokenizer.save(tmp_path / "tok")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHATML_TEMPLATE and cfg["bos_token"] == "<s>"
    assert json.loads((d / "special_tokens_map.json").read_text())["additional_special_tokens"] == [IM_START, IM_END]
    spm = Tokenizer.load(d)
    assert spm.kind == "sentencepiece" and spm.vocab_size == tokenizer.vocab_size
    # a user's tokenizer.json (LlamaTokenizerFast layout) alone: the HF backend gives the same ids
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_text((d / "tokenizer.json").read_text())
    (hf_dir / "tokenizer_config.json").write_text((d / "tokenizer_config.json").read_text())
    hf = Tokenizer.load(hf_dir)
    assert hf.kind == "tokenizers"
    assert (hf.bos_id, hf.eos_id, hf.im_start_id, hf.im_end_id) == (1, 2, 3, 4)
    for text in ROUND_TRIP:
        assert hf.encode(text) == tokenizer.encode(text), text
        assert hf.decode(hf.encode(text)) == text
    assert hf.encode_chat(MESSAGES) == tokenizer.encode_chat(MESSAGES)
    assert [t for _, _, t in hf.pieces()] == [t for _, _, t in tokenizer.pieces()]


def test_dummy_prefix_model_prefixes_every_fragment(corpus_dir):
    """A Llama/MiniCPM model with a dummy prefix: each text fragment between special tokens gets its "▁", which
    is what llama.cpp and HF's legacy Llama tokenizer do."""
    from data_pipeline.corpus import iter_docs

    texts = [d["text"] for d in iter_docs(corpus_dir)][:300]
    tok = train_sentencepiece(texts, 600, add_dummy_prefix=True)
    assert tok.add_dummy_prefix
    ids = tok.encode("<|im_start|>user")
    assert ids[0] == tok.im_start_id and tok.id_to_piece(ids[1]).startswith("▁")
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_small_vocabulary_trains_on_chinese(corpus_dir):
    """Thousands of distinct CJK characters do not fit 512 pieces: rare ones are left to byte fallback."""
    from data_pipeline.corpus import iter_docs

    texts = [d["text"] for d in iter_docs(corpus_dir)]
    tok = train_sentencepiece(texts, 512)
    assert tok.vocab_size == 512
    zh = next(t for t in texts if "的" in t)
    assert tok.decode(tok.encode(zh)) == zh
