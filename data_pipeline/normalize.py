"""UltraClean text preprocessing for the fastText quality classifier (spec §4.1; Ultra-FineWeb's inference demo).

  1. collapse runs of blank lines and of spaces (redundant whitespace),
  2. lower-case (English; CJK has no case),
  3. strip diacritics (NFKD, drop combining marks),
  4. split into tokens: the LM tokenizer's pieces (the paper uses its tokenizer; this also segments Chinese,
     which fastText cannot) or, with `simple`, regex words with one token per CJK character,
  5. keep newlines and tabs as the literal tokens `\\n` / `\\t` / `\\r` (fastText reads one line per example).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable, Optional, Sequence

_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*(\n[ \t\r\f\v]*)+\n")  # 3+ line breaks (blank lines may hold spaces)
_SPACES = re.compile(r"[ \u00a0\u3000\f\v]+")
_SIMPLE_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+|[^\w\s]|\n|\t|\r", re.UNICODE)
_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
# Combining marks left by NFKD (Latin/Greek/Cyrillic diacritics and the other combining blocks), removed by one
# C-speed regex instead of a per-character Python loop.
_COMBINING = re.compile("[\u0300-\u036f\u0483-\u0489\u0591-\u05bd\u0610-\u061a\u064b-\u065f\u0e31-\u0e3a"
                        "\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\u302a-\u302f\u3099\u309a\ufe20-\ufe2f]")


def clean(text: str) -> str:
    """Steps 1-3: whitespace and blank-line normalisation, lower-case, diacritics stripped."""
    text = _BLANK_LINES.sub("\n\n", text)
    text = _SPACES.sub(" ", text)
    text = text.lower()
    if not text.isascii():
        text = _COMBINING.sub("", unicodedata.normalize("NFKD", text))
    return text


def _escape(tok: str) -> str:
    return _ESCAPES.get(tok, tok)


def simple_tokens(text: str) -> list[str]:
    return [_escape(t) for t in _SIMPLE_TOKEN.findall(text)]


class Preprocessor:
    """text -> one line of space-separated tokens, the fastText input; `many(texts)` for batches.

    kind "spm": SentencePiece pieces of the cleaned text, given the model's pieces (id order) and an id encoder
    (`encode(list_of_texts) -> list of id lists`); pieces lose the "▁" word marker, newline/tab/CR (byte pieces or
    inside pieces) become the literal tokens `\\n`/`\\t`/`\\r`. kind "simple": regex words, one token per CJK
    character.
    """

    def __init__(self, kind: str = "spm", pieces: Optional[Sequence[str]] = None,
                 encode: Optional[Callable[[list[str]], list[list[int]]]] = None):
        if kind not in ("spm", "simple"):
            raise ValueError(f"classifier.tokenization: unknown kind {kind!r}")
        if kind == "spm" and (pieces is None or encode is None):
            raise ValueError("classifier.tokenization 'spm' needs the tokenizer's pieces and encoder")
        self.kind = kind
        self.encode = encode
        if pieces is not None:
            byte_names = {"<0x0A>": "\\n", "<0x09>": "\\t", "<0x0D>": "\\r"}
            table = str.maketrans({"▁": None, "\n": "\\n", "\t": "\\t", "\r": "\\r", " ": None})
            # one feature string per id, computed once: the per-document work is a list lookup and a join
            self.features = [byte_names.get(p) or p.translate(table) for p in pieces]

    def __call__(self, text: str) -> str:
        return self.many([text])[0]

    def many(self, texts: Sequence[str]) -> list[str]:
        cleaned = [clean(t) for t in texts]
        if self.kind == "simple":
            return [" ".join(simple_tokens(t)) for t in cleaned]
        get = self.features.__getitem__
        return [" ".join(filter(None, map(get, ids))) for ids in self.encode(cleaned)]
