"""Tokenizer: a Llama/MiniCPM-style SentencePiece BPE with byte fallback, trained on the corpus or loaded from a
user's `tokenizer.model` / `tokenizer.json` (MiniCPM, a base model, any Llama-style SentencePiece model), behind one
interface with a chat template.

Chat tokens are optional: a tokenizer without `<|im_start|>` / `<|im_end|>` (a base model's, MiniCPM-1/2's) loads,
encodes, decodes, saves and exports; its `im_start_id` / `im_end_id` are None and its chat template is the one in its
tokenizer_config.json, if any (ChatML is the default only when the ChatML tokens exist). Rendering a chat with no
template raises ValueError.

Added tokens: a SentencePiece model loaded from a directory also takes the tokens of `added_tokens.json`
({content: id}) and `tokenizer_config.json` (`added_tokens_decoder`: {id: {content, special}}), as llama.cpp's
converter (convert_hf_to_gguf.py `_create_vocab_sentencepiece`) does: an id past the SentencePiece vocabulary extends
it (unfilled ids in between are `[PAD{i}]` UNUSED), an id inside it re-labels that piece; the type is CONTROL for a
`special` token, else USER_DEFINED. Like the ChatML pieces, every added token is parsed out of any text as one id and
decodes to its own text.

Training follows data-offline.md §3 so that llama.cpp's SPM tokenizer reproduces our ids: identity normalization,
remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, byte_fallback, split_digits, unk/bos/eos = 0/1/2,
and `<|im_start|>` / `<|im_end|>` as USER_DEFINED pieces (llama.cpp always parses user-defined tokens in text).

Text is split at special-token strings first and every fragment between them is encoded on its own. For a model
with a dummy prefix that is exactly what llama.cpp and HF's Llama tokenizers do (a "▁" before each fragment);
without one (our default) it equals SentencePiece's encoding of the whole string.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from data_pipeline.records import atomic_path, write_json, write_text

log = logging.getLogger("data_pipeline")

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
# ChatML with a leading BOS (MiniCPM's format). Rendered with HF's Jinja semantics; see apply_chat_template.
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")

# llama.cpp token types (tokenizer.ggml.token_type); SentencePiece's ModelProto.SentencePiece.Type uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


# ====================================================================== backends
class _SPM:
    """sentencepiece.SentencePieceProcessor over a serialized ModelProto, plus the added tokens of an HF tokenizer
    config (`added`: id -> (content, special)) laid over / past its pieces as llama.cpp's converter lays them.

    SentencePiece runs on a derived ModelProto in which every added token is a USER_DEFINED piece at its id (padding
    ids in between are CONTROL `[PAD{i}]` pieces that decode to nothing), so encode and decode stay SentencePiece's
    own: a re-labelled piece's old text is no longer a piece (as in llama.cpp's vocabulary), and an added token
    decodes to its text in place, with SentencePiece's dummy-prefix handling around it. `proto_bytes` stays the
    model's own file; `pieces()` gives the types llama.cpp gets (CONTROL for a special added token).
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, added: Optional[dict[int, tuple[str, bool]]] = None):
        import sentencepiece as spm   # heavy: only for SentencePiece models

        pb = sentencepiece_model_pb2()
        self.proto_bytes = model_proto
        self.proto = pb.ModelProto()
        self.proto.ParseFromString(model_proto)
        self.added = {int(i): (str(c), bool(s)) for i, (c, s) in sorted((added or {}).items())}
        n_model = len(self.proto.pieces)
        # ids whose piece differs from the model's: id -> (piece, score, llama.cpp type)
        self.over: dict[int, tuple[str, float, int]] = {}
        for i, (content, special) in self.added.items():
            if i < 0 or not content:
                raise ValueError(f"added token {content!r}: bad id {i} or empty text")
            if i < n_model:
                p = self.proto.pieces[i]
                if p.piece == content and p.type in (USER_DEFINED, CONTROL, UNKNOWN):
                    continue  # already a whole-token piece (the ChatML markers, <s>, </s>, <unk>): kept as it is
            if content in (BOS, EOS, UNK):
                continue  # the model's own specials, wherever a config lists them
            self.over[i] = (content, -1000.0, CONTROL if special else USER_DEFINED)
        self.n_model = n_model
        if self.over:
            model_proto = self._derived_proto(pb)
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._n = self.sp.get_piece_size()

    def _derived_proto(self, pb) -> bytes:
        proto = pb.ModelProto()
        proto.CopyFrom(self.proto)
        n = max(self.over) + 1
        for i in range(self.n_model, n):
            proto.pieces.add(piece=f"[PAD{i}]", score=-1000.0, type=CONTROL)
        where = {p.piece: i for i, p in enumerate(proto.pieces) if i not in self.over}
        for i, (content, score, _) in self.over.items():
            if content in where:
                raise ValueError(f"added token {content!r} (id {i}) is also piece {where[content]} of the model: one "
                                 "text cannot have two ids")
            old = proto.pieces[i]
            if i < self.n_model and old.piece != content and old.type in (NORMAL, BYTE):
                log.warning("added token %d %r replaces the piece %r", i, content, old.piece)
            old.piece, old.score, old.type = content, score, USER_DEFINED
            where[content] = i
        return proto.SerializeToString()

    def vocab_size(self) -> int:
        return self._n

    def piece_to_id(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        r = self.sp.encode(text, out_type="offset_mapping")
        return list(r["ids"]), [tuple(o) for o in r["offsets"]]

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def pieces(self) -> list[tuple[str, float, int]]:
        out = [(p.piece, float(p.score), int(p.type)) for p in self.proto.pieces]
        out += [(f"[PAD{i}]", -1000.0, UNUSED) for i in range(self.n_model, self._n)]
        for i, p in self.over.items():
            out[i] = p
        return out

    def added_tokens(self) -> dict[int, tuple[str, bool]]:
        return dict(self.added)

    def add_dummy_prefix(self) -> bool:
        return bool(self.proto.normalizer_spec.add_dummy_prefix)

    def special_ids(self) -> dict[str, Optional[int]]:
        t = self.proto.trainer_spec
        ok = lambda i: i if 0 <= i < self.vocab_size() else None  # noqa: E731
        return {"unk": ok(t.unk_id), "bos": ok(t.bos_id), "eos": ok(t.eos_id), "pad": ok(t.pad_id)}

    def user_defined(self) -> dict[str, int]:
        """Pieces parsed out of any text: the model's USER_DEFINED pieces and the added tokens."""
        out = {p.piece: i for i, p in enumerate(self.proto.pieces) if p.type == USER_DEFINED and i not in self.over}
        out.update({c: i for i, (c, _, _) in self.over.items()})
        return out

    def normalizer_warning(self) -> Optional[str]:
        n = self.proto.normalizer_spec
        if n.name not in ("identity", "") or n.remove_extra_whitespaces:
            return (f"normalizer {n.name!r} (remove_extra_whitespaces={n.remove_extra_whitespaces}) is not reproduced "
                    "by llama.cpp; GGUF exports of this tokenizer will tokenize differently")
        return None


class _HF:
    """HF `tokenizers` (tokenizer.json): a user's MiniCPM LlamaTokenizerFast export."""

    kind = "tokenizers"

    def __init__(self, json_text: str):
        from tokenizers import Tokenizer as HFTokenizer   # heavy: only for tokenizer.json models

        self.json_text = json_text
        self.tok = HFTokenizer.from_str(json_text)
        self.spec = json.loads(json_text)

    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def piece_to_id(self, piece: str) -> Optional[int]:
        return self.tok.token_to_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i) or f"[PAD{i}]"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        e = self.tok.encode(text, add_special_tokens=False)
        return list(e.ids), [tuple(o) for o in e.offsets]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def pieces(self) -> list[tuple[str, float, int]]:
        added = {a["id"]: a for a in self.spec.get("added_tokens", [])}
        unk = self.spec.get("model", {}).get("unk_token")
        out = []
        for i in range(self.vocab_size()):
            piece = self.tok.id_to_token(i)
            if piece is None or piece == f"[PAD{i}]":  # a hole, or a padding id (as spm_to_hf_json writes them)
                out.append((f"[PAD{i}]", 0.0, UNUSED))
            elif piece == unk:
                out.append((piece, 0.0, UNKNOWN))
            elif i in added:
                out.append((piece, 0.0, CONTROL if added[i].get("special") else USER_DEFINED))
            elif _BYTE_PIECE.match(piece):
                out.append((piece, 0.0, BYTE))
            else:
                # BPE ranks follow ids in Llama-family vocabularies: a falling score keeps llama.cpp's merge order
                out.append((piece, -float(i), NORMAL))
        return out

    def add_dummy_prefix(self) -> bool:
        norm = json.dumps(self.spec.get("normalizer") or {})
        pre = json.dumps(self.spec.get("pre_tokenizer") or {})
        return '"Prepend"' in norm or '"prepend_scheme": "always"' in pre or '"add_prefix_space": true' in pre

    def special_ids(self) -> dict[str, Optional[int]]:
        unk = self.spec.get("model", {}).get("unk_token")
        return {"unk": self.tok.token_to_id(unk) if unk else None, "bos": self.tok.token_to_id(BOS),
                "eos": self.tok.token_to_id(EOS), "pad": None}

    def user_defined(self) -> dict[str, int]:
        return {a["content"]: a["id"] for a in self.spec.get("added_tokens", [])}

    def added_tokens(self) -> dict[int, tuple[str, bool]]:
        return {a["id"]: (a["content"], bool(a.get("special"))) for a in self.spec.get("added_tokens", [])}

    def normalizer_warning(self) -> Optional[str]:
        return None


# ====================================================================== the interface
class Tokenizer:
    """encode/decode, special ids, chat template and assistant mask, save/load, GGUF metadata.

    Attributes: vocab_size, bos_id, eos_id, unk_id, pad_id, im_start_id / im_end_id (None without ChatML tokens),
    chat_template (Jinja, or None: the config's own, else ChatML when the ChatML tokens exist), add_dummy_prefix,
    kind ("sentencepiece" | "tokenizers"), path (where it was loaded from, if anywhere), added_tokens.
    """

    def __init__(self, backend: Any, *, chat_template: Optional[str] = None,
                 extra_specials: Optional[dict[str, int]] = None, path: Optional[Path] = None):
        self._b = backend
        self.kind = backend.kind
        self.path = path
        ids = backend.special_ids()
        self.unk_id = ids["unk"] if ids["unk"] is not None else 0
        self.bos_id = ids["bos"] if ids["bos"] is not None else backend.piece_to_id(BOS)
        self.eos_id = ids["eos"] if ids["eos"] is not None else backend.piece_to_id(EOS)
        if self.bos_id is None or self.eos_id is None:
            raise ValueError(f"tokenizer at {path} has no BOS/EOS token ({BOS!r}/{EOS!r})")
        self.pad_id = ids["pad"] if ids["pad"] is not None else self.unk_id  # Llama has no pad: padding is masked
        # Tokens parsed out of raw text: the model's user-defined pieces (and added tokens from a config)
        self._specials: dict[str, int] = dict(backend.user_defined())
        self._specials.update(extra_specials or {})
        for s in (IM_START, IM_END):
            if s not in self._specials:
                pid = backend.piece_to_id(s)
                if pid is not None and pid != self.unk_id:
                    self._specials[s] = pid
        # ChatML is needed only for ChatML chats: without its tokens the ids are None and there is no default template
        self.im_start_id: Optional[int] = self._specials.get(IM_START)
        self.im_end_id: Optional[int] = self._specials.get(IM_END)
        has_chatml = self.im_start_id is not None and self.im_end_id is not None
        self.chat_template: Optional[str] = chat_template or (CHATML_TEMPLATE if has_chatml else None)
        # Control and unknown pieces (<s>, </s>, <unk>) are parsed from text only when asked (parse_special=True),
        # as llama.cpp (special=True) and HF do.
        self._controls = {p: i for i, (p, _, t) in enumerate(backend.pieces()) if t in (CONTROL, UNKNOWN)}
        self._controls.update({BOS: self.bos_id, EOS: self.eos_id})
        self._split_re = self._make_split(self._specials)
        self._split_all_re = self._make_split({**self._specials, **self._controls})
        # first characters of every special-token string: text without any of them needs no splitting
        self._lead = frozenset(t[0] for t in (*self._specials, *self._controls) if t)
        self._jinja = None
        warn = backend.normalizer_warning()
        if warn:
            log.warning("tokenizer %s: %s", path, warn)

    @staticmethod
    def _make_split(tokens: dict[str, int]):
        alts = sorted(tokens, key=len, reverse=True)
        return re.compile("(" + "|".join(re.escape(t) for t in alts) + ")") if alts else None

    # ------------------------------------------------------------------ basics
    @property
    def vocab_size(self) -> int:
        return self._b.vocab_size()

    @property
    def add_dummy_prefix(self) -> bool:
        return self._b.add_dummy_prefix()

    @property
    def added_tokens(self) -> dict[int, tuple[str, bool]]:
        """id -> (text, special) of the tokens the tokenizer config adds (tokenizer.json's added tokens for the
        `tokenizers` kind); special ones are CONTROL tokens in a GGUF."""
        return self._b.added_tokens()

    def _plain(self, text: str) -> bool:
        """Whether `text` cannot contain a special-token string (the fast path)."""
        return not any(c in text for c in self._lead)

    def _fragments(self, text: str, parse_special: bool) -> list[tuple[str, Optional[int], int]]:
        """(fragment text, special id or None, char offset) pieces of `text` split at special-token strings."""
        if self._plain(text):  # fast path: no special-token string can occur
            return [(text, None, 0)] if text else []
        rx = self._split_all_re if parse_special else self._split_re
        table = {**self._specials, **self._controls} if parse_special else self._specials
        out, pos = [], 0
        for part in (rx.split(text) if rx else [text]):
            if part:
                out.append((part, table.get(part), pos))
            pos += len(part)
        return out

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, *,
               parse_special: bool = False) -> list[int]:
        """Token ids of `text`. `<|im_start|>`/`<|im_end|>` in the text always become their ids; control and
        unknown pieces (`<s>`, `</s>`, `<unk>`) only with parse_special=True (as llama.cpp `special=True` / HF)."""
        ids = [self.bos_id] if add_bos else []
        for frag, sid, _ in self._fragments(text, parse_special):
            if sid is not None:
                ids.append(sid)
            else:
                ids.extend(self._b.encode(frag))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                     num_threads: int = 2) -> list[list[int]]:
        """`encode` of many texts; SentencePiece encodes them in `num_threads` C++ threads."""
        if self.kind != "sentencepiece" or not all(self._plain(t) for t in texts):
            return [self.encode(t, add_bos, add_eos) for t in texts]
        ids = self._b.sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)
        return ids

    def encode_with_offsets(self, text: str, *, parse_special: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and the (start, end) character span of each token in `text` (byte-fallback pieces of one character
        share its span; all but the last have zero length)."""
        ids, spans = [], []
        for frag, sid, off in self._fragments(text, parse_special):
            if sid is not None:
                ids.append(sid)
                spans.append((off, off + len(frag)))
            else:
                fids, fspans = self._b.encode_offsets(frag)
                ids.extend(fids)
                spans.extend((off + a, off + b) for a, b in fspans)
        return ids, spans

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; BOS/EOS/pad are dropped, ChatML and added tokens are kept as text."""
        drop = {self.bos_id, self.eos_id}
        if self.pad_id != self.unk_id:
            drop.add(self.pad_id)
        return self._b.decode([int(i) for i in ids if int(i) not in drop])

    def id_to_piece(self, i: int) -> str:
        return self._b.id_to_piece(int(i))

    # ------------------------------------------------------------------ chat
    def _render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        if self.chat_template is None:
            raise ValueError(f"tokenizer {self.path or '(built in memory)'} has no chat template: its "
                             "tokenizer_config.json sets no chat_template and it has no ChatML tokens "
                             f"({IM_START}, {IM_END}); it can encode text but not render chat messages")
        if self._jinja is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment   # only when a chat template is rendered

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # HF's settings
            self._jinja = env.from_string(self.chat_template)
        return self._jinja.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                  bos_token=BOS, eos_token=EOS, raise_exception=_raise_template_error)

    @staticmethod
    def _check_messages(messages: Sequence[dict]) -> None:
        if not messages:
            raise ValueError("messages: need at least one message")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}]: expected {{'role': str, 'content': str}}, got {m!r}")
            if m["role"] not in ROLES:
                raise ValueError(f"messages[{i}].role: {m['role']!r} is not one of {ROLES}")

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text (ChatML with BOS); `encode(..., parse_special=True)` of it == encode_chat ids."""
        self._check_messages(messages)
        return self._render(messages, add_generation_prompt)

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, assistant_mask): mask is 1 on the tokens of each assistant reply and the `<|im_end|>` that closes
        it, 0 elsewhere (system/user turns, role headers, the newline after `<|im_end|>`).

        The reply spans come from rendering the template on growing prefixes of the conversation, so any template
        whose renderings are prefixes of each other (ChatML is) works.
        """
        self._check_messages(messages)
        text = self._render(messages, add_generation_prompt)
        targets: list[tuple[int, int]] = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], True)
            upto = self._render(messages[: i + 1], False)
            if not text.startswith(upto) or not upto.startswith(before):
                raise ValueError("chat template renderings are not prefixes of each other; cannot locate replies")
            end = len(upto.rstrip())  # the reply plus its <|im_end|>, not the newline after it
            targets.append((len(before), end))
        ids, spans = self.encode_with_offsets(text, parse_special=True)
        mask = []
        for a, b in spans:
            b = max(b, a + 1)
            mask.append(int(any(a < te and b > ts for ts, te in targets)))
        return ids, mask

    # ------------------------------------------------------------------ GGUF metadata
    def pieces(self) -> list[tuple[str, float, int]]:
        """(piece, score, llama.cpp token type) for every id: 1 NORMAL 2 UNKNOWN 3 CONTROL 4 USER_DEFINED 5 UNUSED
        6 BYTE."""
        return self._b.pieces()

    # ------------------------------------------------------------------ save / load
    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.model (SentencePiece) or tokenizer.json, plus HF tokenizer_config.json (with the chat
        template, if any, and the added tokens) and special_tokens_map.json. A SentencePiece model also gets an
        equivalent tokenizer.json (LlamaTokenizerFast layout) so HF fast tokenizers load it."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if self.kind == "sentencepiece":
            with atomic_path(d / "tokenizer.model") as tmp:
                tmp.write_bytes(self._b.proto_bytes)
            write_text(d / "tokenizer.json", spm_to_hf_json(self._b.proto_bytes, self._b.added))
        else:
            write_text(d / "tokenizer.json", self._b.json_text)
        # a config's own `special` flags; the model's user-defined pieces (ChatML) are written special as before
        flags = {i: sp for i, (_, sp) in self._b.added.items()} if self.kind == "sentencepiece" else {}
        added, extra = {}, []
        for content, i in sorted({**self._specials, UNK: self.unk_id, BOS: self.bos_id, EOS: self.eos_id}.items(),
                                 key=lambda kv: kv[1]):
            special = flags.get(i, True) or content in (BOS, EOS, UNK)
            added[str(i)] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": special}
            if special and content not in (BOS, EOS, UNK):
                extra.append(content)
        config = {
            "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
            "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": None,
            "additional_special_tokens": extra, "added_tokens_decoder": added,
            "chat_template": self.chat_template, "clean_up_tokenization_spaces": False,
            "legacy": True, "add_prefix_space": self.add_dummy_prefix, "spaces_between_special_tokens": False,
            "model_max_length": 1 << 20, "sp_model_kwargs": {},
        }
        if self.chat_template is None:
            del config["chat_template"]
        write_json(d / "tokenizer_config.json", config)
        write_json(d / "special_tokens_map.json", {
            "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "additional_special_tokens": extra})
        return d

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a directory (tokenizer.model preferred, else tokenizer.json; tokenizer_config.json supplies
        the chat template and, with added_tokens.json, added tokens) or from a tokenizer.model / tokenizer.json
        file (the config files next to it are read too)."""
        p = Path(path)
        if p.is_dir():
            d = p
            model = d / "tokenizer.model" if (d / "tokenizer.model").exists() else d / "tokenizer.json"
        else:
            d, model = p.parent, p
        if not model.exists():
            raise FileNotFoundError(f"no tokenizer.model or tokenizer.json at {path}")
        template, extra = None, {}
        # id -> (content, special), in llama.cpp's converter's order: added_tokens.json, then added_tokens_decoder
        added: dict[int, tuple[str, bool]] = {}
        at_path = d / "added_tokens.json"
        if at_path.exists() and model.suffix == ".model":
            at = _read_json(at_path)
            if not isinstance(at, dict) or not all(isinstance(k, str) and type(v) is int for k, v in at.items()):
                raise ValueError(f"{at_path}: expected {{token text: id}}")
            added.update({v: (k, False) for k, v in at.items()})
        cfg_path = d / "tokenizer_config.json"
        if cfg_path.exists():
            tc = _read_json(cfg_path)
            if not isinstance(tc, dict):
                raise ValueError(f"{cfg_path}: expected a JSON object")
            template = tc.get("chat_template") if isinstance(tc.get("chat_template"), str) else None
            for k, v in (tc.get("added_tokens_decoder") or {}).items():
                if not isinstance(v, dict) or not isinstance(v.get("content"), str) or not v["content"]:
                    continue
                try:
                    i = int(k)
                except ValueError:
                    raise ValueError(f"{cfg_path}: added_tokens_decoder key {k!r} is not a token id") from None
                added[i] = (v["content"], bool(v.get("special")))
                if v["content"] not in (BOS, EOS, UNK):
                    extra[v["content"]] = i
        if model.suffix == ".model":
            backend = _SPM(model.read_bytes(), added)
            extra = {}  # the backend lays the added tokens over / past its pieces
        elif model.suffix == ".json":
            backend = _HF(model.read_text(encoding="utf-8"))
        else:
            raise ValueError(f"{model}: expected tokenizer.model or tokenizer.json")
        return cls(backend, chat_template=template, extra_specials=extra, path=model)

    @classmethod
    def from_sentencepiece_proto(cls, proto: bytes) -> "Tokenizer":
        return cls(_SPM(proto))

    def __repr__(self) -> str:
        return (f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
                f"im_start={self.im_start_id}, im_end={self.im_end_id}, add_dummy_prefix={self.add_dummy_prefix})")

    # ------------------------------------------------------------------ pickling (grain workers)
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_jinja"] = None
        if self._b.kind == "sentencepiece":
            state["_b"] = (self._b.kind, self._b.proto_bytes, self._b.added)
        else:
            state["_b"] = (self._b.kind, self._b.json_text, None)
        return state

    def __setstate__(self, state):
        kind, payload, added = state["_b"]
        state["_b"] = _SPM(payload, added) if kind == "sentencepiece" else _HF(payload)
        self.__dict__.update(state)


def sentencepiece_model_pb2():
    """sentencepiece's generated ModelProto module (protobuf model editing, SentencePiece models only).

    sentencepiece 0.2.3 ships code generated for protobuf 7.36 that refuses an older protobuf runtime on import
    (VersionError), while apache-beam (`minicpm data process`) needs protobuf < 7. The module itself only
    registers a serialized descriptor through the builder API that protobuf 5 and 6 have as well, so with an older
    runtime it is imported once with that version check skipped."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
        return pb
    except ImportError:
        raise
    except Exception as e:  # google.protobuf.runtime_version.VersionError (absent from protobuf 5)
        if type(e).__name__ != "VersionError":
            raise
    from google.protobuf import runtime_version

    check = runtime_version.ValidateProtobufRuntimeVersion
    runtime_version.ValidateProtobufRuntimeVersion = lambda *args, **kwargs: None
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    finally:
        runtime_version.ValidateProtobufRuntimeVersion = check
    return pb


def _raise_template_error(message: str):
    """`raise_exception` of HF chat templates (a config's own template may call it)."""
    raise ValueError(f"chat template: {message}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


# ====================================================================== training
def train_sentencepiece(texts: Iterable[str], vocab_size: int, *, character_coverage: float = 0.9995,
                        add_dummy_prefix: bool = False, num_threads: int = 2, seed: int = 0) -> Tokenizer:
    """Train a Llama-style SentencePiece BPE on `texts` (documents; split into lines, as SentencePiece trains on
    lines, so newlines are byte-fallback `<0x0A>` tokens exactly as in Llama)."""
    import sentencepiece as spm   # heavy: only for SentencePiece models

    def lines(texts):
        for t in texts:
            for line in t.split("\n"):
                if line.strip():
                    yield line

    texts = _fit_characters(list(texts), vocab_size, character_coverage)
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)  # the trainer samples/shuffles lines with it
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(texts), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=[IM_START, IM_END], add_dummy_prefix=add_dummy_prefix,
        character_coverage=character_coverage, num_threads=num_threads, max_sentence_length=16384,
        shuffle_input_sentence=True, input_sentence_size=0, hard_vocab_limit=False, minloglevel=2)
    tok = Tokenizer.from_sentencepiece_proto(buf.getvalue())
    if tok.vocab_size != vocab_size:
        log.warning("tokenizer: trained %d pieces, asked for %d (the corpus sample is too small for more)",
                    tok.vocab_size, vocab_size)
    return tok


def _fit_characters(texts: list[str], vocab_size: int, coverage: float) -> list[str]:
    """Make the training text fit a small vocabulary. SentencePiece must keep every character within
    `character_coverage` (>= 0.98) as a piece and refuses to train when they outnumber the vocabulary, which a small
    vocabulary on Chinese text hits (thousands of distinct characters). Then only the most frequent characters,
    half the room left after the 256 byte pieces and the specials, stay in the training text; the others become
    spaces there, and byte fallback encodes them at run time."""
    room = (vocab_size - 256 - 5) // 2
    if room <= 0:
        raise ValueError(f"data.vocab_size {vocab_size} is too small: it needs 256 byte pieces and 5 specials")
    counts: collections.Counter = collections.Counter()
    for t in texts:
        counts.update(t)
    ranked = [c for c, _ in counts.most_common() if c not in " \n"]
    total = sum(counts[c] for c in ranked)
    need, acc = 0, 0
    for c in ranked:  # characters SentencePiece would require at this coverage
        if acc >= coverage * total:
            break
        acc += counts[c]
        need += 1
    if need <= room:
        return texts
    log.info("tokenizer: %d characters needed at coverage %.4f but a %d-piece vocabulary has room for %d; the rest "
             "are byte-fallback", need, coverage, vocab_size, room)
    table = {ord(c): " " for c in ranked[room:]}
    return [t.translate(table) for t in texts]


# ====================================================================== SentencePiece -> tokenizer.json
def spm_to_hf_json(model_proto: bytes, added: Optional[dict[int, tuple[str, bool]]] = None) -> str:
    """An HF `tokenizers` BPE equivalent to a SentencePiece BPE model (what transformers' LlamaConverter builds):
    merges are every split of a piece into two pieces, ranked by the merged piece's score. `added` (id ->
    (content, special)) are the tokens a tokenizer config adds, laid over / past the pieces as `_SPM` lays them."""
    from tokenizers import AddedToken   # heavy: only for tokenizer.json models
    from tokenizers import Tokenizer as HFTokenizer   # heavy: only for tokenizer.json models
    from tokenizers import decoders, models, normalizers   # heavy: only for tokenizer.json models

    spm_ = _SPM(model_proto, added)
    proto = spm_.proto
    pieces = spm_.pieces()
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    merges = []
    for i, (piece, score, typ) in enumerate(pieces):
        if typ != NORMAL:
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((lft, rgt, score, i) for lft, rgt in local)
    merges.sort(key=lambda m: (-m[2], m[3]))
    unk = pieces[proto.trainer_spec.unk_id][0]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for a, b, _, _ in merges], unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    norms = [normalizers.Replace(" ", "▁")]
    decs = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        norms.insert(0, normalizers.Prepend("▁"))
        decs.append(decoders.Strip(" ", 1, 0))
    tok.normalizer = normalizers.Sequence(norms)
    tok.decoder = decoders.Sequence(decs)
    special = [AddedToken(p, special=True, normalized=False) for p, _, t in pieces if t in (CONTROL, UNKNOWN)]
    # user-defined pieces (the ChatML markers) stay non-special added tokens: matched in any text, like
    # SentencePiece's USER_DEFINED pieces (and so typed USER_DEFINED again when read back). Added tokens past the
    # SentencePiece pieces are in the BPE vocabulary at their ids (no merge makes them), so they keep those ids.
    user = [AddedToken(p, special=False, normalized=False) for p, _, t in pieces if t == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    return tok.to_str()


def bytes_per_token(tok: Tokenizer, texts: Iterable[str]) -> float:
    """UTF-8 bytes per token over `texts` (the compression figure of data-offline.md §3)."""
    nbytes = ntok = 0
    for t in texts:
        nbytes += len(t.encode("utf-8"))
        ntok += len(tok.encode(t))
    return nbytes / max(ntok, 1)
