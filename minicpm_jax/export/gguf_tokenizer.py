"""The project tokenizer as llama.cpp's SentencePiece (`llama`) vocabulary (edge-export.md §3a).

`tokenizer.ggml.model = "llama"`, `pre = "default"`, every piece in id order with its score and token type, byte
pieces `<0xXX>` typed BYTE (llama.cpp's byte fallback), bos/eos/unk ids, `add_space_prefix` = the model's
`add_dummy_prefix`, and the tokenizer's chat template (none for a tokenizer without one, e.g. a base model's).
Verified on 3379/3379 strings for a SentencePiece BPE trained with identity normalization and
`remove_extra_whitespaces=False`; other normalizers are refused (llama.cpp applies no NFKC and never collapses
whitespace, so their ids would differ).

Token types: the ChatML markers are written CONTROL, as HF's `added_tokens_decoder` marks them `special` and as
llama.cpp's own converter writes special added tokens. (llama.cpp forces `<|im_end|>` to CONTROL anyway: it detects
it as end-of-turn by its text.) CONTROL strings are parsed out of text only with `tokenize(..., special=True)`, which
is what llama.cpp's completion and chat paths use; that mode equals `Tokenizer.encode(text, parse_special=True)`.
With `special=False` llama.cpp tokenizes `<s>`, `</s>`, `<|im_start|>`, `<|im_end|>` as plain text.

Added tokens (tokenizer_config.json `added_tokens_decoder` / added_tokens.json, laid over or past the SentencePiece
pieces by data_pipeline's Tokenizer as llama.cpp's converter does) are written at their ids: CONTROL when `special`,
else USER_DEFINED (which llama.cpp parses out of text in both modes, as our Tokenizer does). A tokenizer without the
ChatML tokens has no end-of-turn id and no template unless its config brings one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

log = logging.getLogger("minicpm_jax.export")

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
CHATML = ("<|im_start|>", "<|im_end|>")


class TokenizerExportError(ValueError):
    """The tokenizer cannot be written as a llama.cpp vocabulary that reproduces our token ids."""


@dataclasses.dataclass
class GGUFVocab:
    """What goes under `tokenizer.*` in the GGUF. tokens/scores/types have exactly n_vocab entries."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    eot_id: Optional[int]
    add_space_prefix: bool
    chat_template: Optional[str]
    n_padding: int


def _compat_problem(tokenizer: Any) -> Optional[str]:
    """Why llama.cpp's SPM tokenizer cannot reproduce this tokenizer, or None."""
    if getattr(tokenizer, "kind", None) != "sentencepiece":
        return (f"tokenizer kind {getattr(tokenizer, 'kind', type(tokenizer).__name__)!r}: only a SentencePiece "
                "model (tokenizer.model) is written as llama.cpp's 'llama' vocabulary with verified parity")
    backend = getattr(tokenizer, "_b", None)   # data_pipeline.tokenizer keeps the normalizer check on its backend
    check = getattr(backend, "normalizer_warning", None)
    return check() if callable(check) else None


def build_vocab(tokenizer: Any, n_vocab: int, *, allow_mismatch: bool = False) -> GGUFVocab:
    """The GGUF vocabulary for a model whose embedding has `n_vocab` rows.

    Rows past the tokenizer's pieces (a vocab padded for sharding) become `[PAD{i}]` UNUSED tokens, as llama.cpp's
    converter writes them; llama.cpp requires exactly one token per embedding row.
    Raises TokenizerExportError for a tokenizer larger than the embedding, or one whose normalization llama.cpp
    cannot reproduce (unless allow_mismatch, which only logs a warning).
    """
    problem = _compat_problem(tokenizer)
    if problem:
        if not allow_mismatch:
            raise TokenizerExportError(f"refusing to export the tokenizer: {problem}. llama.cpp would tokenize text "
                                       "differently from training. Retrain it Llama-style (data_pipeline.tokenizer."
                                       "train_sentencepiece) or pass allow_tokenizer_mismatch / "
                                       "--allow-tokenizer-mismatch to write it anyway.")
        log.warning("TOKENIZER MISMATCH: %s; llama.cpp will tokenize some text differently", problem)
    pieces = tokenizer.pieces()
    if len(pieces) > n_vocab:
        raise TokenizerExportError(f"the tokenizer has {len(pieces)} tokens but the model's embedding has only "
                                   f"{n_vocab} rows (vocab_size); ids >= {n_vocab} would have no embedding")
    tokens = [p for p, _, _ in pieces]
    scores = [float(s) for _, s, _ in pieces]
    types = [int(t) for _, _, t in pieces]
    for special in CHATML:
        i = _find(tokens, special)
        if i is not None and types[i] == USER_DEFINED:
            types[i] = CONTROL
    # special added tokens are CONTROL, as llama.cpp's converter writes them (a model's own USER_DEFINED piece that
    # the config marks special included): like the ChatML markers, llama.cpp then parses them with special=True only
    for i, (text, special) in (getattr(tokenizer, "added_tokens", None) or {}).items():
        if special and 0 <= i < len(tokens) and tokens[i] == text and types[i] == USER_DEFINED:
            types[i] = CONTROL
    if len(set(tokens)) != len(tokens):
        dup = next(t for t in tokens if tokens.count(t) > 1)
        raise TokenizerExportError(f"the tokenizer has the piece {dup!r} twice; llama.cpp maps text to one id")
    n_pad = n_vocab - len(tokens)
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(UNUSED)
    im_end = getattr(tokenizer, "im_end_id", None)
    return GGUFVocab(tokens=tokens, scores=scores, types=types, bos_id=int(tokenizer.bos_id),
                     eos_id=int(tokenizer.eos_id), unk_id=int(tokenizer.unk_id),
                     eot_id=None if im_end is None else int(im_end),
                     add_space_prefix=bool(tokenizer.add_dummy_prefix),
                     chat_template=getattr(tokenizer, "chat_template", None), n_padding=n_pad)


def _find(tokens: list[str], piece: str) -> Optional[int]:
    try:
        return tokens.index(piece)
    except ValueError:
        return None


def add_vocab(writer, vocab: GGUFVocab, pad_id: Optional[int] = None) -> None:
    """Write the `tokenizer.*` keys into a gguf.GGUFWriter."""
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    if vocab.eot_id is not None:
        writer.add_eot_token_id(vocab.eot_id)
    if pad_id is not None:
        writer.add_pad_token_id(pad_id)
    # MiniCPM needs a BOS in front of every prompt (spec §1.1, README note on vLLM); the chat template adds its own.
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    writer.add_remove_extra_whitespaces(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def add_no_vocab(writer) -> None:
    """A model without a tokenizer: llama.cpp's `no_vocab` (evaluates token ids; cannot tokenize text). llama.cpp
    then takes the vocabulary size from `{arch}.vocab_size`, which the writer always sets."""
    writer.add_tokenizer_model("no_vocab")
