"""A GGUF's own tokenizer (llama.cpp's, through llama-cpp-python) behind the interface the evaluation code uses.

The needle builder, the lm-eval backends and the tasks call `encode`, `encode_batch`, `encode_with_offsets`,
`decode`, `bos_id`, `eos_id`, `pad_id`, `vocab_size`, `path`, `chat_template` and `apply_chat_template` on
`data_pipeline.tokenizer.Tokenizer`. This class answers the same calls from the vocabulary inside the GGUF file, so
a GGUF is scored with the ids llama.cpp gives its prompts, not with a tokenizer kept beside it. Where the two could
differ, it follows our Tokenizer's conventions:

  * `encode(text)` parses `<|im_start|>` / `<|im_end|>` out of the text (ours always does; they are CONTROL tokens in
    the GGUF, which llama.cpp parses only with `special=True`); `<s>`, `</s>`, `<unk>` only with parse_special.
  * `decode(ids)` drops BOS and EOS, keeps the ChatML markers as text, writes <unk> as " ⁇ ", and, for a
    vocabulary with a space prefix, drops the one space SentencePiece's decoder strips at the start.
Whether the ids equal our Tokenizer's is checked in tests/evals (and for the export itself in tests/export).
"""

from __future__ import annotations

import codecs
import ctypes
from pathlib import Path
from typing import Iterable, Optional, Sequence

import llama_cpp
from jinja2.sandbox import ImmutableSandboxedEnvironment

from data_pipeline.tokenizer import BOS, EOS, IM_END, IM_START, UNK
from minicpm_jax.export.llamacpp import check_gguf

_CHATML = (IM_START, IM_END)
UNK_SURFACE = " \u2047 ".encode("utf-8")


def _per_byte(err: UnicodeDecodeError) -> tuple[str, int]:
    """One U+FFFD per undecodable byte, as SentencePiece's decoder writes them (Python's "replace" writes one per
    maximal invalid sequence)."""
    return "\ufffd", err.start + 1


codecs.register_error("minicpm_per_byte", _per_byte)


class LlamaCppTokenizer:
    """Tokenizer of the GGUF that `llm` (a `llama_cpp.Llama`) was loaded from; `path` is that file."""

    kind = "gguf"

    def __init__(self, llm, path: str | Path):
        self._llm = llm
        self._model = llm._model       # the vocabulary calls (token_to_piece) live on the low-level model
        self.path = Path(path)
        meta = llm.metadata
        self.bos_id, self.eos_id = int(llm.token_bos()), int(llm.token_eos())
        self.unk_id = int(meta.get("tokenizer.ggml.unknown_token_id", 0))
        self.pad_id = int(meta.get("tokenizer.ggml.padding_token_id", self.unk_id))
        self.add_dummy_prefix = meta.get("tokenizer.ggml.add_space_prefix", "false") == "true"
        self.chat_template: Optional[str] = meta.get("tokenizer.chat_template")
        self._vocab_size = int(llm.n_vocab())
        self._pieces: dict[int, bytes] = {}     # id -> bytes; decode runs after every generated token
        # llama.cpp's end-of-generation ids (EOS, and <|im_end|> as EOT when the vocabulary has ChatML)
        self.eog_ids = frozenset(i for i in range(self._vocab_size)
                                 if llama_cpp.llama_vocab_is_eog(self._model.vocab, i))

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaCppTokenizer":
        """The tokenizer of a GGUF file, loading its vocabulary only (no weights)."""
        check_gguf(path)
        try:
            llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        except ValueError as e:
            raise ValueError(f"{path}: llama.cpp cannot read its vocabulary ({e})") from None
        return cls(llm, path)

    @property
    def vocab_size(self) -> int:
        """Every id of the file's vocabulary ([PAD] rows included: they decode to nothing)."""
        return self._vocab_size

    # ------------------------------------------------------------------ encode
    def _special(self, text: str, parse_special: bool) -> bool:
        """llama.cpp's `special` flag that gives our Tokenizer's ids for `text` (see the module docstring)."""
        if parse_special:
            return True
        if any(m in text for m in _CHATML):
            if any(c in text for c in (BOS, EOS, UNK)):
                raise ValueError("GGUF tokenizer: text with both ChatML markers and <s>/</s>/<unk> strings is "
                                 "ambiguous without parse_special; pass parse_special=True")
            return True
        return False

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, *,
               parse_special: bool = False) -> list[int]:
        """int ids of `text` as llama.cpp tokenizes it (BOS first / EOS last when asked)."""
        ids = list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=self._special(text, parse_special)))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, add_eos: bool = False,
                     num_threads: int = 2) -> list[list[int]]:
        return [self.encode(t, add_bos, add_eos) for t in texts]

    def _raw_piece(self, i: int) -> bytes:
        """The bytes token `i` stands for (control tokens as their text; llama-cpp-python's own `token_to_piece`
        returns a fixed 32-byte buffer, so the length is taken from the C call here)."""
        if i in self._pieces:
            return self._pieces[i]
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._model.vocab, i, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._model.vocab, i, buf, len(buf), 0, True)
        self._pieces[i] = buf.raw[:n]
        return self._pieces[i]

    def encode_with_offsets(self, text: str, *, parse_special: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and the (start, end) character span of each token in `text`; the byte pieces of one character share
        its start, all but the last with zero length (as `Tokenizer.encode_with_offsets`)."""
        ids = self.encode(text, parse_special=parse_special)
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # a space prefix is one extra leading character in the pieces, not in `text`
        shift = 1 if self.add_dummy_prefix and ids and self._raw_piece(ids[0]).startswith(b" ") else 0
        spans, pos = [], -shift
        for i in ids:
            n = len(dec.decode(self._raw_piece(i)))
            spans.append((max(pos, 0), max(pos + n, 0)))
            pos += n
        return ids, spans

    # ------------------------------------------------------------------ decode
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (BOS/EOS dropped; each undecodable byte becomes U+FFFD)."""
        drop = {self.bos_id, self.eos_id}
        if self.pad_id != self.unk_id:
            drop.add(self.pad_id)
        # <unk> reads as SentencePiece's unknown surface " ⁇ " (what our Tokenizer's decode gives), not its name
        data = b"".join(UNK_SURFACE if int(i) == self.unk_id else self._raw_piece(int(i))
                        for i in ids if int(i) not in drop)
        if self.add_dummy_prefix and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="minicpm_per_byte")

    def id_to_piece(self, i: int) -> str:
        return self._model.token_get_text(int(i))

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The file's `tokenizer.chat_template` rendered with HF's Jinja settings (as our Tokenizer renders it)."""
        if not self.chat_template:
            raise ValueError(f"{self.path} has no tokenizer.chat_template")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=EOS)
