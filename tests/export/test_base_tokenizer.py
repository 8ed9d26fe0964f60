"""Tokenizers without ChatML tokens (a base model's, MiniCPM-1/2's, any Llama-style tokenizer.model) load, encode,
save and export to GGUF; added tokens from tokenizer_config.json / added_tokens.json extend or re-label the
SentencePiece vocabulary as llama.cpp's converter does, and llama.cpp tokenizes the exported GGUF identically."""

import json
import pickle

import pytest

from data_pipeline.tokenizer import (BOS, CHATML_TEMPLATE, CONTROL, EOS, IM_END, IM_START, UNK, UNUSED, USER_DEFINED,
                                     Tokenizer)
from minicpm_jax.export import llamacpp
from minicpm_jax.export.gguf import to_gguf
from minicpm_jax.export.gguf_tokenizer import build_vocab

from .conftest import N_PIECES, make_cfg, make_params
from .test_gguf_tokenizer import adversarial_strings

N_BASE = N_PIECES - 2           # the trained model less its two ChatML pieces
TEXTS = ["The quick brown fox jumps over the lazy dog.", "中文分词测试，这是一个句子。", "x1y22z333 3.14159",
         "  leading and   runs\n\tof whitespace  ", "def f(x):\n    return x ** 2\n",
         "😀 ünïcödé Привет"]
# added tokens: the ChatML markers and a user-defined token past the vocabulary (one padding id in between), a
# special token re-labelling a model piece, and `[MASK]` from added_tokens.json
RELABEL = 1500
ADDED = {N_BASE: (IM_START, True), N_BASE + 1: (IM_END, True), N_BASE + 3: ("<tool_call>", False),
         RELABEL: ("<|reserved_0|>", True)}
MASK_ID = N_BASE + 4


def base_proto(tokenizer, dummy_prefix: bool = False) -> bytes:
    """A real SentencePiece BPE (the export tests' trained model: byte fallback, identity normalization) without
    ChatML pieces, as a Llama base model's tokenizer.model is."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tokenizer._b.proto_bytes)
    keep = [p for p in proto.pieces if p.type != USER_DEFINED]
    del proto.pieces[:]
    proto.pieces.extend(keep)
    proto.normalizer_spec.add_dummy_prefix = dummy_prefix
    return proto.SerializeToString()


def write_dir(d, proto: bytes, config=None, added_tokens=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.model").write_bytes(proto)
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config))
    if added_tokens is not None:
        (d / "added_tokens.json").write_text(json.dumps(added_tokens))
    return d


def hf_config(added: dict, **kw) -> dict:
    """tokenizer_config.json as HF writes it for a Llama tokenizer: the model's own specials listed too."""
    dec = {str(i): {"content": c, "special": True} for i, c in enumerate((UNK, BOS, EOS))}
    dec.update({str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                         "special": s} for i, (c, s) in added.items()})
    return {"tokenizer_class": "LlamaTokenizer", "added_tokens_decoder": dec, **kw}


def export(tok, path):
    cfg = make_cfg()
    return llamacpp.open_model(to_gguf(path, cfg, make_params(cfg), tok, "f16").path, logits_all=False, f32_kv=False)


def mismatches(tok, llm, strings, special: bool):
    return [(s, tok.encode(s, parse_special=special), llamacpp.tokenize(llm, s, special=special)) for s in strings
            if tok.encode(s, parse_special=special) != llamacpp.tokenize(llm, s, special=special)]


@pytest.fixture(scope="module")
def base_dir(tokenizer, tmp_path_factory):
    return write_dir(tmp_path_factory.mktemp("base"), base_proto(tokenizer))


def test_base_tokenizer_loads_encodes_and_saves(base_dir, tmp_path):
    import sentencepiece as spm

    tok = Tokenizer.load(base_dir)
    assert (tok.im_start_id, tok.im_end_id, tok.chat_template) == (None, None, None)
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, N_BASE)
    assert not [p for p, _, t in tok.pieces() if t == USER_DEFINED]
    sp = spm.SentencePieceProcessor(model_file=str(base_dir / "tokenizer.model"))
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>"]:  # ChatML text is plain text here
        assert tok.encode(text) == sp.encode(text), text
        assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text
    assert tok.encode("<s>hi</s>", parse_special=True)[::len(tok.encode("hi")) + 1] == [1, 2]
    again = Tokenizer.load(tok.save(tmp_path / "saved"))
    cfg = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())
    assert "chat_template" not in cfg and cfg["additional_special_tokens"] == []
    assert again.chat_template is None and again.im_end_id is None
    assert pickle.loads(pickle.dumps(again)).encode(TEXTS[1]) == again.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_chat_without_template_is_a_clear_error(base_dir):
    tok = Tokenizer.load(base_dir)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=r"has no chat template") as e:
        tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert str(base_dir / "tokenizer.model") in str(e.value)
    with pytest.raises(ValueError, match=r"has no chat template"):
        tok.encode_chat(msgs)


def test_config_chat_template_without_chatml(base_dir, tmp_path):
    """A MiniCPM-1-style chat format (not ChatML): the config's template is used, no ChatML ids are invented."""
    template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
                "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<用户>{{ m['content'] }}<AI>"
                "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    d = write_dir(tmp_path / "t", (base_dir / "tokenizer.model").read_bytes(), {"chat_template": template})
    tok = Tokenizer.load(d)
    assert tok.chat_template == template and tok.im_end_id is None
    text = tok.apply_chat_template([{"role": "user", "content": "你好"}], add_generation_prompt=True)
    assert text == "<s><用户>你好<AI>"
    ids, mask = tok.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert ids[0] == tok.bos_id and ids == tok.encode("<s><用户>hi<AI>yo", parse_special=True)
    assert mask[-1] == 1 and mask[0] == 0 and 0 < sum(mask) < len(ids)
    with pytest.raises(ValueError, match="no system turns"):  # HF templates' raise_exception
        tok.apply_chat_template([{"role": "system", "content": "x"}])


@pytest.mark.parametrize("dummy_prefix", [False, True], ids=["no-prefix", "dummy-prefix"])
def test_base_tokenizer_gguf_parity(tokenizer, tmp_path, dummy_prefix):
    """The GGUF of a ChatML-less tokenizer: llama.cpp's ids == ours in both modes; no template, no end-of-turn."""
    tok = Tokenizer.load(write_dir(tmp_path / "tok", base_proto(tokenizer, dummy_prefix)))
    llm = export(tok, tmp_path / "m.gguf")
    assert "tokenizer.chat_template" not in llm.metadata and "tokenizer.ggml.eot_token_id" not in llm.metadata
    assert llm.metadata["tokenizer.ggml.add_space_prefix"] == str(dummy_prefix).lower()
    strings = adversarial_strings(tokenizer)  # ChatML-rendered chats among them: plain text for this tokenizer
    bad = mismatches(tok, llm, strings, special=True)
    print(f"base tokenizer parity (special=True, dummy prefix {dummy_prefix}): {len(strings) - len(bad)}/"
          f"{len(strings)}")
    assert not bad, bad[:3]
    plain = [s for s in strings if BOS not in s and EOS not in s]
    bad = mismatches(tok, llm, plain, special=False)
    assert not bad, bad[:3]
    assert len(llamacpp.tokenize(llm, "<|im_end|>", special=True)) > 1


@pytest.mark.parametrize("dummy_prefix", [False, True], ids=["no-prefix", "dummy-prefix"])
def test_added_tokens_from_config(tokenizer, tmp_path, dummy_prefix):
    d = write_dir(tmp_path / "tok", base_proto(tokenizer, dummy_prefix), hf_config(ADDED),
                  added_tokens={"[MASK]": MASK_ID})
    tok = Tokenizer.load(d)
    # the vocabulary: extended past the model (a [PAD] id in the gap), one model piece re-labelled
    pieces = tok.pieces()
    assert tok.vocab_size == len(pieces) == MASK_ID + 1
    assert [(p, t) for p, _, t in pieces[N_BASE:]] == [(IM_START, CONTROL), (IM_END, CONTROL),
                                                       (f"[PAD{N_BASE + 2}]", UNUSED), ("<tool_call>", USER_DEFINED),
                                                       ("[MASK]", USER_DEFINED)]
    assert pieces[RELABEL][::2] == ("<|reserved_0|>", CONTROL)
    assert tok.added_tokens[MASK_ID] == ("[MASK]", False) and tok.added_tokens[RELABEL] == ("<|reserved_0|>", True)
    # ChatML came with the config: its ids and the default template
    assert (tok.im_start_id, tok.im_end_id, tok.chat_template) == (N_BASE, N_BASE + 1, CHATML_TEMPLATE)
    # every added token in text is its id, in both modes, and decodes back to its text
    for text, i in [("<tool_call>", N_BASE + 3), ("[MASK]", MASK_ID), ("<|reserved_0|>", RELABEL),
                    (IM_END, N_BASE + 1)]:
        s = f"a {text}b"
        assert tok.encode(s) == tok.encode(s, parse_special=True) == tok.encode("a ") + [i] + tok.encode("b")
        assert tok.id_to_piece(i) == text and text in tok.decode(tok.encode(s))
    if not dummy_prefix:
        s = "x<tool_call>y [MASK]<|im_start|>user\n中文<|im_end|>\n<|reserved_0|>1"
        assert tok.decode(tok.encode(s)) == s

    llm = export(tok, tmp_path / "m.gguf")
    v = build_vocab(tok, make_cfg().vocab_size)
    assert (v.types[N_BASE + 1], v.types[N_BASE + 3], v.eot_id) == (CONTROL, USER_DEFINED, N_BASE + 1)
    assert llm.metadata["tokenizer.chat_template"] == CHATML_TEMPLATE
    messages = [{"role": "user", "content": "2+2 = ?  中文"}, {"role": "assistant", "content": "4 <tool_call>"}]
    chat = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert tok.encode_chat(messages, add_generation_prompt=True)[0] == llamacpp.tokenize(llm, chat, special=True)
    with_added = ["<tool_call>", "[MASK]", "<|reserved_0|>", " <tool_call> [MASK]x", "中文<tool_call>\n\n[MASK]  ",
                  "<tool_call><tool_call>", "<tool_call[MASK]>", "[MASK]<|reserved_0|>12345<|im_end|>"]
    strings = adversarial_strings(tokenizer) + with_added
    bad = mismatches(tok, llm, strings, special=True)
    print(f"added-token parity (special=True, dummy prefix {dummy_prefix}): {len(strings) - len(bad)}/{len(strings)}")
    assert not bad, bad[:3]
    # USER_DEFINED added tokens are parsed by llama.cpp without special=True as well; CONTROL ones only with it
    controls = (BOS, EOS, IM_START, IM_END, "<|reserved_0|>")
    bad = mismatches(tok, llm, [s for s in strings if not any(c in s for c in controls)], special=False)
    assert not bad, bad[:3]
    assert llamacpp.tokenize(llm, "<|reserved_0|>", special=False) != [RELABEL]
    # llama.cpp's text of the ids (the first token is an added one, so no leading-space difference)
    ids = tok.encode("<tool_call>x [MASK] 中文<|im_end|>y")
    assert llm.detokenize(ids, special=True).decode("utf-8") == tok.decode(ids)


def test_added_tokens_survive_save_and_tokenizer_json(tokenizer, tmp_path):
    """Saving keeps the added tokens (and their `special` flags); the saved tokenizer.json (HF backend) agrees."""
    tok = Tokenizer.load(write_dir(tmp_path / "tok", base_proto(tokenizer, True), hf_config(ADDED),
                                   added_tokens={"[MASK]": MASK_ID}))
    out = tok.save(tmp_path / "saved")
    dec = json.loads((out / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert dec[str(MASK_ID)]["special"] is False and dec[str(N_BASE + 1)]["special"] is True
    spm_again = Tokenizer.load(out)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "tokenizer.json").write_text((out / "tokenizer.json").read_text())
    hf = Tokenizer.load(tmp_path / "hf")
    assert hf.kind == "tokenizers" and hf.vocab_size == tok.vocab_size
    assert [t for _, _, t in hf.pieces()][N_BASE:] == [t for _, _, t in tok.pieces()][N_BASE:]
    for s in TEXTS + ["a<tool_call>b [MASK]c<|im_end|>\n<|reserved_0|> d"]:
        assert spm_again.encode(s) == hf.encode(s) == tok.encode(s), s


def test_added_token_that_is_already_a_piece_is_refused(tokenizer, tmp_path):
    proto = base_proto(tokenizer)
    piece = Tokenizer.from_sentencepiece_proto(proto).id_to_piece(700)
    d = write_dir(tmp_path / "tok", proto, hf_config({N_BASE: (piece, False)}))
    with pytest.raises(ValueError, match="one text cannot have two ids"):
        Tokenizer.load(d)


def test_model_user_defined_piece_marked_special_is_control_in_gguf(tokenizer, tmp_path):
    """A model's own USER_DEFINED piece that the config marks special (as MiniCPM's configs mark its chat tokens)
    stays one always-parsed id for us and is written CONTROL, as llama.cpp's converter writes it."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(base_proto(tokenizer))
    proto.pieces.add(piece="<think>", score=0.0, type=USER_DEFINED)
    proto.pieces.add(piece="<tool>", score=0.0, type=USER_DEFINED)
    config = hf_config({N_BASE: ("<think>", True), N_BASE + 1: ("<tool>", False)})
    tok = Tokenizer.load(write_dir(tmp_path / "tok", proto.SerializeToString(), config))
    assert tok.vocab_size == N_BASE + 2 and tok.pieces()[N_BASE][2] == tok.pieces()[N_BASE + 1][2] == USER_DEFINED
    assert tok.encode("a<think>b<tool>") == tok.encode("a") + [N_BASE] + tok.encode("b") + [N_BASE + 1]
    v = build_vocab(tok, make_cfg().vocab_size)
    assert (v.types[N_BASE], v.types[N_BASE + 1]) == (CONTROL, USER_DEFINED)
