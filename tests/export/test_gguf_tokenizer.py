"""Our SentencePiece tokenizer and llama.cpp's tokenization of the exported GGUF give the same ids (edge-export §3a)."""

import numpy as np
import pytest

from minicpm_jax.export import llamacpp
from minicpm_jax.export.gguf import to_gguf
from minicpm_jax.export.gguf_tokenizer import CONTROL, UNUSED, TokenizerExportError, build_vocab

from .conftest import N_PIECES, corpus_texts, make_cfg, make_params

SPECIALS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>"]
FIXED = [
    # whitespace runs, tabs, newlines, NBSP / ideographic space, leading / trailing spaces
    " ", "  ", "    ", "   leading", "trailing   ", "a  b   c    d", "\t", "\t\tx", "\n", "\n\n\n", "\r\n",
    "line1\n  line2\n\tline3\n    ", " \n \n ", "\u00a0", "a\u00a0b", "\u3000x\u3000", "\ufeffbom", "x\u200by",
    # digits (split_digits), numbers with separators, non-ASCII digits
    "0", "12345678901234567890", "3.14159", "1,000,000", "2024-06-01T12:30", "x1y22z333", "١٢٣", "①②③", "Ⅻ",
    # CJK, other scripts, combining marks, compatibility forms NFKC would change
    "中文分词测试，这是一个句子。", "我正在写这本书的心得", "日本語のテキストです", "한국어 텍스트", "龘靐齉",
    "Привет, мир!", "مرحبا بالعالم", "e\u0301 vs é", "ﬁ ligature", "ＡＢＣ fullwidth", "x²+y²",
    # emoji: ZWJ sequences, skin tones, flags, variation selectors
    "😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "❤️ love", "🇫🇷🇨🇳", "a😀b😀c",
    # special tokens and near-misses, byte-piece and padding-piece text
    "<|im_start|>", "<|im_end|>", "<|im_start|>user\nhello<|im_end|>\n", "<s>", "</s>", "<s>hi</s>", "<unk>",
    "<|im_start", "|im_end|>", "<<|im_start|>>", "<|im_end|><|im_end|>", "<0x0A>", "[PAD2001]",
    # code
    "def f(x):\n    return x ** 2\n", "{'a': [1, 2, {\"b\": None}]}", "for (int i = 0; i < n; ++i) {}",
    "    if x:\n\t\treturn", "#!/usr/bin/env python3", "a\x00b", "\x7f\x1b[0m",
]


def adversarial_strings(tokenizer) -> list[str]:
    rng = np.random.default_rng(0)
    held_out = [line for t in corpus_texts()[-400:] for line in t.splitlines() if line.strip()][:300]
    alphabet = list("aAzZ019 \t\n.,;:!?'\"()[]{}<>|/\\_-+*=#@$%^&~`") + list("中文日本語한국ЖжéüßΩπ") + \
        ["\u00a0", "\u200d", "😀", "👍🏽", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "  ", "\n\n", "123"]
    rand = ["".join(rng.choice(alphabet, rng.integers(1, 40))) for _ in range(400)]
    chats = [tokenizer.apply_chat_template([{"role": "system", "content": "You are helpful."},
                                            {"role": "user", "content": "2+2 = ?  \n 中文 😀"},
                                            {"role": "assistant", "content": "4"}], add_generation_prompt=True),
             tokenizer.apply_chat_template([{"role": "user", "content": "  spaces  "}], add_generation_prompt=False)]
    return FIXED + chats + held_out + rand


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    cfg = make_cfg()
    path = to_gguf(tmp_path_factory.mktemp("tok") / "m.gguf", cfg, make_params(cfg), tokenizer, "f16").path
    return llamacpp.open_model(path, logits_all=False, f32_kv=False)


def test_ids_identical_with_special_parsing(tokenizer, exported):
    """special=True (llama.cpp's completion/chat mode) == Tokenizer.encode(parse_special=True), "<unk>" included."""
    strings = adversarial_strings(tokenizer)
    bad = [(s, tokenizer.encode(s, parse_special=True), llamacpp.tokenize(exported, s, special=True))
           for s in strings]
    bad = [b for b in bad if b[1] != b[2]]
    print(f"tokenizer parity (special=True): {len(strings) - len(bad)}/{len(strings)} strings identical")
    assert not bad, bad[:3]


def test_ids_identical_as_plain_text(tokenizer, exported):
    """special=False: llama.cpp reads control-token strings as text; on strings without them the ids agree."""
    strings = [s for s in adversarial_strings(tokenizer) if not any(t in s for t in SPECIALS)]
    bad = [s for s in strings if tokenizer.encode(s) != llamacpp.tokenize(exported, s, special=False)]
    print(f"tokenizer parity (special=False, no special-token text): {len(strings) - len(bad)}/{len(strings)}")
    assert not bad, bad[:3]


def test_chat_template_bos_and_detokenize(tokenizer, exported):
    md = exported.metadata
    assert md["tokenizer.chat_template"] == tokenizer.chat_template
    assert exported.token_bos() == tokenizer.bos_id and exported.token_eos() == tokenizer.eos_id
    # add_bos_token is on: a plain prompt gets MiniCPM's BOS, exactly once
    assert llamacpp.tokenize(exported, "hi", add_bos=True)[0] == tokenizer.bos_id
    ids = tokenizer.encode("Привет 中文 😀  x\n")
    assert exported.detokenize(ids).decode("utf-8") == tokenizer.decode(ids)


def test_vocab_padding_and_special_types(tokenizer):
    v = build_vocab(tokenizer, 2048)
    assert len(v.tokens) == len(v.scores) == len(v.types) == 2048
    assert v.tokens[N_PIECES:] == [f"[PAD{i}]" for i in range(N_PIECES, 2048)]
    assert set(v.types[N_PIECES:]) == {UNUSED}
    for s in ("<|im_start|>", "<|im_end|>", "<s>", "</s>"):
        assert v.types[v.tokens.index(s)] == CONTROL
    assert v.eot_id == tokenizer.im_end_id


def test_tokenizer_larger_than_embedding_is_an_error(tokenizer, tmp_path):
    cfg = make_cfg(vocab_size=1024)
    with pytest.raises(TokenizerExportError, match=f"{N_PIECES} tokens but the model's embedding has only 1024"):
        to_gguf(tmp_path / "m.gguf", cfg, make_params(cfg), tokenizer, "f32")
    assert not list(tmp_path.iterdir())


def test_nfkc_tokenizer_is_refused(tmp_path):
    """A SentencePiece model with the library's default normalizer (nmt_nfkc, whitespace collapsing) cannot be
    reproduced by llama.cpp: the export refuses it unless asked to write it anyway."""
    import io

    import sentencepiece as spm

    from data_pipeline.tokenizer import Tokenizer

    buf = io.BytesIO()
    lines = [line for t in corpus_texts()[:300] for line in t.splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
                                   vocab_size=400, byte_fallback=True, user_defined_symbols=SPECIALS[:2],
                                   minloglevel=2)
    tok = Tokenizer.from_sentencepiece_proto(buf.getvalue())
    cfg = make_cfg(vocab_size=512)
    with pytest.raises(TokenizerExportError, match="nmt_nfkc"):
        to_gguf(tmp_path / "m.gguf", cfg, make_params(cfg), tok, "f32")
    to_gguf(tmp_path / "m.gguf", cfg, make_params(cfg), tok, "f32", allow_tokenizer_mismatch=True)


def test_dummy_prefix_tokenizer_matches_too(tmp_path):
    """MiniCPM's own tokenizer.model uses SentencePiece's dummy prefix: llama.cpp's add_space_prefix follows it."""
    from data_pipeline.tokenizer import train_sentencepiece

    tok = train_sentencepiece(corpus_texts(), N_PIECES, character_coverage=0.98, add_dummy_prefix=True)
    cfg = make_cfg()
    llm = llamacpp.open_model(to_gguf(tmp_path / "m.gguf", cfg, make_params(cfg), tok, "f16").path,
                              logits_all=False, f32_kv=False)
    assert llm.metadata["tokenizer.ggml.add_space_prefix"] == "true"
    strings = adversarial_strings(tok)
    bad = [s for s in strings if tok.encode(s, parse_special=True) != llamacpp.tokenize(llm, s, special=True)]
    print(f"tokenizer parity with dummy prefix: {len(strings) - len(bad)}/{len(strings)}")
    assert not bad, bad[:3]
