"""One call that prepares everything the main job reads: `prepare_data(workdir, cfg) -> PreparedData`.

    corpus/      built from the sources (corpus.build_corpus)                     <- cfg sources, caps, seed
    tokenizer/   trained SentencePiece BPE (or the user's, cfg.tokenizer.path)   <- corpus, vocab_size
    classifier/  iterative UltraClean fastText + rounds.json                      <- corpus, tokenizer, classifier cfg
    tokens/      train/<source>-*.array_record, eval/<source>-*.array_record: token records with their quality
                 score (filtering by threshold happens in the grain pipeline, so one preparation serves any
                 threshold or mixture)                                              <- all of the above
    sft/         (task "sft") conversations.jsonl and token records with assistant masks
    prepared.json  paths and a summary (sources used, counts, classifier metrics, timings)

Each step is cached: it records a fingerprint of its inputs in `stamp.json` and is skipped when the fingerprint
matches; otherwise it is rebuilt in a temporary directory that replaces the old one only when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
from tqdm.auto import tqdm

from data_pipeline import classifier as K
from data_pipeline import corpus as C
from data_pipeline import records, sft
from data_pipeline.config import DataConfig
from data_pipeline.report import DropReport
from data_pipeline.tokenizer import Tokenizer, bytes_per_token, train_sentencepiece

log = logging.getLogger("data_pipeline")


@dataclasses.dataclass
class PreparedData:
    """Paths and objects the trainer needs; `make_train_iterator(prepared, cfg, ...)` reads it."""

    workdir: Path
    task: str
    tokenizer: Tokenizer
    tokenizer_dir: Path
    classifier_dir: Optional[Path]
    train_shards: dict[str, list[str]]
    eval_shards: dict[str, list[str]]
    summary: dict

    def shards(self, split: str) -> dict[str, list[str]]:
        return dict(self.train_shards if split == "train" else self.eval_shards)

    def classifier(self) -> Optional[K.QualityClassifier]:
        return K.QualityClassifier.load(self.classifier_dir) if self.classifier_dir else None


def load_prepared(workdir: str | Path) -> PreparedData:
    """PreparedData of an earlier prepare_data run (reads workdir/prepared.json)."""
    w = Path(workdir)
    s = records.read_json(w / "prepared.json")
    abs_ = lambda d: {k: [str(w / p) for p in v] for k, v in d.items()}  # noqa: E731
    return PreparedData(workdir=w, task=s["task"], tokenizer=Tokenizer.load(w / s["tokenizer_dir"]),
                        tokenizer_dir=w / s["tokenizer_dir"],
                        classifier_dir=(w / s["classifier_dir"]) if s.get("classifier_dir") else None,
                        train_shards=abs_(s["train_shards"]), eval_shards=abs_(s["eval_shards"]), summary=s)


# ---------------------------------------------------------------- caching
def _fp(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(d: Path, key: str) -> bool:
    stamp = d / "stamp.json"
    return stamp.exists() and records.read_json(stamp).get("key") == key


@contextlib.contextmanager
def _step_dir(d: Path, key: str) -> Iterator[Path]:
    """Build a step into a temporary directory; swap it in with its stamp only if the block succeeds."""
    tmp = d.with_name(f".{d.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        records.write_json(tmp / "stamp.json", {"key": key, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
        old = d.with_name(f".{d.name}.old-{os.getpid()}")
        if d.exists():
            os.replace(d, old)
        os.replace(tmp, d)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- steps
def tokenizer_texts(corpus_dir: Path, manifest: dict, max_bytes: int, seed: int) -> list[str]:
    """Training-split documents of the training sources, interleaved by source, up to max_bytes."""
    names = [n for n, m in manifest["sources"].items() if not m.get("heldout")]
    per = {n: [d["text"] for d in C.iter_docs(corpus_dir, [n], split="train")] for n in names}
    rng = random.Random(seed)
    for v in per.values():
        rng.shuffle(v)
    out, size, i = [], 0, 0
    while size < max_bytes and any(i < len(v) for v in per.values()):
        for v in per.values():
            if i < len(v):
                out.append(v[i])
                size += len(v[i].encode("utf-8"))
        i += 1
    return out


def _write_tokens(corpus_dir: Path, manifest: dict, out: Path, tok: Tokenizer,
                  clf: Optional[K.QualityClassifier], lines_by_id: Optional[dict[str, str]], threshold: float,
                  progress: Callable[[int], None]) -> dict:
    """Score + tokenize every document; write train/ and eval/ token shards per source; return per-source stats."""
    stats = {}
    for name, meta in manifest["sources"].items():
        docs = list(C.iter_docs(corpus_dir, [name]))
        texts = [d["text"] for d in docs]
        if clf is None:
            scores = np.full(len(docs), np.nan, np.float32)
        elif lines_by_id is not None:
            scores = clf.predict_lines([lines_by_id[d["id"]] for d in docs])
        else:
            scores = clf.score(texts)
        by_split: dict[str, list[bytes]] = {"train": [], "eval": []}
        ntok = {"train": 0, "eval": 0}
        for d, s, ids in zip(docs, scores, tok.encode_batch(texts, add_bos=True, add_eos=True)):
            split = "eval" if d["split"] == "eval" or meta.get("heldout") else "train"
            by_split[split].append(records.document_token_record({**d, "source": name}, ids, s))
            ntok[split] += len(ids)
        for split, recs in by_split.items():
            if recs:
                records.write_shards(recs, out / split, name, max_shard_bytes=128 << 20)
        valid = scores[~np.isnan(scores)] if len(scores) else scores
        stats[name] = {"docs": len(docs), "train_tokens": ntok["train"], "eval_tokens": ntok["eval"],
                       "mean_score": round(float(valid.mean()), 4) if len(valid) else None,
                       "kept_at_threshold": round(float((valid >= threshold).mean()), 4) if len(valid) else None}
        progress(len(docs))
    return stats


def default_eval_sources(manifest: dict) -> list[str]:
    """LM eval sets: sources with eval documents that are not raw (held-out hq sources and eval tails)."""
    return [n for n, m in manifest["sources"].items()
            if m["split_docs"].get("eval", 0) > 0 and m.get("label") != "raw"]


def _where(path: Path, workdir: Path) -> str:
    """Relative to the workdir when inside it (the workdir can move), else absolute (a user's tokenizer)."""
    try:
        return str(Path(path).resolve().relative_to(workdir.resolve()))
    except ValueError:
        return str(Path(path).resolve())


def _relative(workdir: Path, shards: dict[str, list[Path]]) -> dict[str, list[str]]:
    return {k: [str(Path(p).relative_to(workdir)) for p in v] for k, v in shards.items()}


# ---------------------------------------------------------------- main entry
def prepare_data(workdir: str | Path, cfg: DataConfig, *, progress: bool = True) -> PreparedData:
    """Build corpus, tokenizer, classifier and token shards under `workdir` (cached), return PreparedData."""
    t0 = time.time()
    w = Path(workdir)
    w.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    steps = ["corpus", "tokenizer", "classifier" if cfg.task == "pretrain" else "sft", "tokens"]
    bar = tqdm(total=len(steps), desc="prepare data", unit="step", disable=not progress, leave=True)

    def done(name: str, t: float, cached: bool) -> None:
        timings[name] = round(time.time() - t, 2)
        bar.set_postfix_str(f"{name} {'cached' if cached else f'{timings[name]:.1f}s'}")
        bar.update(1)
        log.info("prepare: %s %s", name, "(cached)" if cached else f"done in {timings[name]:.1f} s")

    # 1. corpus
    t = time.time()
    corpus_dir = w / "corpus"
    corpus_key = C.corpus_fingerprint(cfg)
    cached = _cached(corpus_dir, corpus_key)
    if not cached:
        report = DropReport()
        with _step_dir(corpus_dir, corpus_key) as tmp:
            C.build_corpus(tmp, cfg, report=report)
        if report.total:
            log.info("%s", report.format())
    manifest = C.load_manifest(corpus_dir)
    done("corpus", t, cached)
    used = ", ".join(f"{n} ({m['tier']})" for n, m in manifest["sources"].items())
    print(f"data sources used: {used}")
    if manifest.get("unavailable"):
        print("data sources unavailable: " + "; ".join(f"{n}: {why}" for n, why in manifest["unavailable"].items()))
        if cached:  # never rebuilt behind the user's back: every process of a job must read the same corpus
            print(f"(cached corpus; delete {corpus_dir} to try fetching the missing sources again)")

    # 2. tokenizer
    t = time.time()
    if cfg.tokenizer.path:
        tok = Tokenizer.load(cfg.tokenizer.path)
        tok_dir = Path(cfg.tokenizer.path)
        tok_dir = tok_dir if tok_dir.is_dir() else tok_dir.parent
        tok_key, cached = _fp("user", str(tok_dir.resolve())), True
    else:
        tok_dir = w / "tokenizer"
        tok_key = _fp(corpus_key, cfg.vocab_size, dataclasses.asdict(cfg.tokenizer), cfg.seed)
        cached = _cached(tok_dir, tok_key)
        if not cached:
            texts = tokenizer_texts(corpus_dir, manifest, int(cfg.tokenizer.max_train_mb * 1e6), cfg.seed)
            tok = train_sentencepiece(texts, cfg.vocab_size, character_coverage=cfg.tokenizer.character_coverage,
                                      add_dummy_prefix=cfg.tokenizer.add_dummy_prefix, seed=cfg.seed)
            with _step_dir(tok_dir, tok_key) as tmp:
                tok.save(tmp)
        tok = Tokenizer.load(tok_dir)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"data.vocab_size ({cfg.vocab_size}) is smaller than the tokenizer's vocabulary "
                         f"({tok.vocab_size}) at {tok_dir}")
    done("tokenizer", t, cached)

    # 3. classifier (pretraining) or conversations (SFT)
    t = time.time()
    clf_dir: Optional[Path] = None
    clf_report: dict = {}
    sft_summary: dict = {}
    lines_by_id: Optional[dict[str, str]] = None  # classifier inputs, computed once for training and scoring
    if cfg.task == "pretrain":
        clf_dir = w / "classifier"
        # threshold only labels reports; the model and the stored scores do not depend on it (see module doc)
        clf_cfg = {k: v for k, v in dataclasses.asdict(cfg.classifier).items() if k != "threshold"}
        clf_key = _fp(tok_key, clf_cfg, cfg.seed)
        cached = _cached(clf_dir, clf_key)
        if not cached:
            lines_by_id = K.preprocess_corpus(corpus_dir, cfg.classifier.tokenization, str(tok_dir.resolve()))
            with _step_dir(clf_dir, clf_key) as tmp:
                K.train_classifier(corpus_dir, tmp, cfg, tokenizer_path=str(tok_dir.resolve()),
                                   lines_by_id=lines_by_id)
        clf_report = records.read_json(clf_dir / "rounds.json")
        done("classifier", t, cached)
    else:
        sft_dir = w / "sft"
        sft_key = _fp(tok_key, dataclasses.asdict(cfg.sft), cfg.seed, cfg.download, cfg.sources)
        cached = _cached(sft_dir, sft_key)
        if not cached:
            with _step_dir(sft_dir, sft_key) as tmp:
                sft.build_sft(tmp, cfg, tok)
        sft_summary = records.read_json(sft_dir / "summary.json")
        done("sft", t, cached)

    # 4. token shards
    t = time.time()
    if cfg.task == "pretrain":
        tok_out = w / "tokens"
        tokens_key = _fp(clf_key, "tokens", 1)
        cached = _cached(tok_out, tokens_key)
        if not cached:
            clf = K.QualityClassifier.load(clf_dir)
            with _step_dir(tok_out, tokens_key) as tmp, \
                    tqdm(total=manifest["total"]["docs"], desc="score+tokenize", unit="doc",
                         disable=not progress, leave=False) as pbar:
                stats = _write_tokens(corpus_dir, manifest, tmp, tok, clf, lines_by_id, cfg.classifier.threshold,
                                      pbar.update)
                records.write_json(tmp / "stats.json", stats)
        token_stats = records.read_json(tok_out / "stats.json")
        train = {n: records.list_shards(tok_out / "train", n) for n in manifest["sources"]}
        evals = {n: records.list_shards(tok_out / "eval", n) for n in manifest["sources"]}
    else:
        tok_out = w / "sft" / "tokens"
        cached = True
        token_stats = sft_summary.get("sources", {})
        names = sorted({records.shard_prefix(p) for split in ("train", "eval")
                        for p in records.list_shards(tok_out / split)})
        train = {n: records.list_shards(tok_out / "train", n) for n in names}
        evals = {n: records.list_shards(tok_out / "eval", n) for n in names}
    train = {k: v for k, v in train.items() if v}
    evals = {k: v for k, v in evals.items() if v}
    if cfg.task == "pretrain":
        wanted = list(cfg.eval_sources) or default_eval_sources(manifest)
        missing = [s for s in wanted if s not in evals]
        if cfg.eval_sources and missing:
            raise ValueError(f"data.eval_sources: {missing} have no eval documents; with eval documents: "
                             f"{', '.join(evals)}")
        evals = {k: evals[k] for k in wanted if k in evals}
    done("tokens", t, cached)
    bar.close()

    eval_texts = [d["text"] for d in C.iter_docs(corpus_dir, list(evals) or None, split=None)][:2000] \
        if cfg.task == "pretrain" else []
    summary = {
        "task": cfg.task, "workdir": str(w.resolve()), "tokenizer_dir": _where(tok_dir, w),
        "classifier_dir": _where(clf_dir, w) if clf_dir else None,
        "train_shards": _relative(w, train), "eval_shards": _relative(w, evals),
        "corpus": {"sources": {n: {k: m[k] for k in ("docs", "bytes", "lang", "label", "tier", "heldout",
                                                      "split_docs")}
                               for n, m in manifest["sources"].items()},
                   "total": manifest["total"], "by_lang": manifest["by_lang"], "pip_only": manifest["pip_only"],
                   "unavailable": manifest.get("unavailable", {}), "dropped": manifest.get("drops", {})},
        "tokenizer": {"vocab_size": tok.vocab_size, "kind": tok.kind,
                      "eval_bytes_per_token": round(bytes_per_token(tok, eval_texts), 3) if eval_texts else None},
        "classifier": {"rounds": [{k: r.get(k) for k in ("round", "train_pos", "train_neg", "heldout")}
                                  for r in clf_report.get("rounds", [])],
                       "final": clf_report.get("final"), "heldout_sources": clf_report.get("heldout_sources"),
                       "threshold": cfg.classifier.threshold} if clf_report else None,
        "tokens": token_stats, "sft": sft_summary or None, "seconds": timings,
        "total_seconds": round(time.time() - t0, 2),
    }
    records.write_json(w / "prepared.json", summary)
    prepared = load_prepared(w)
    log.info("prepared data in %.1f s at %s", time.time() - t0, w)
    return prepared


def format_summary(p: PreparedData) -> str:
    """Human-readable lines: sources, tokens, classifier metrics, where things are."""
    s = p.summary
    lines = [f"prepared ({s['task']}) at {s['workdir']} in {s['total_seconds']:.1f} s"]
    corp = s["corpus"]
    lines.append(f"  corpus: {corp['total']['docs']} docs, {corp['total']['bytes'] / 1e6:.1f} MB"
                 f"{' (pip-only)' if corp['pip_only'] else ''}; by language: "
                 + ", ".join(f"{k} {v['docs']} docs/{v['bytes'] / 1e6:.1f} MB" for k, v in corp["by_lang"].items()))
    for n, m in corp["sources"].items():
        t = s["tokens"].get(n, {}) if s.get("tokens") else {}
        lines.append(f"    {n:22s} {m['tier']:6s} {m['label'] or '-':3s} {m['docs']:6d} docs {m['bytes'] / 1e6:6.2f} MB"
                     + (f"  train tok {t.get('train_tokens', 0):8d}  eval tok {t.get('eval_tokens', 0):7d}"
                        f"  kept {t.get('kept_at_threshold')}" if t else "")
                     + ("  [held out]" if m["heldout"] else ""))
    if corp["unavailable"]:
        lines.append("  unavailable: " + "; ".join(f"{k}: {v}" for k, v in corp["unavailable"].items()))
    lines.append(f"  tokenizer: {s['tokenizer']['kind']}, vocab {s['tokenizer']['vocab_size']}, "
                 f"{s['tokenizer']['eval_bytes_per_token']} bytes/token on eval text  ({s['tokenizer_dir']})")
    if s.get("classifier"):
        for r in s["classifier"]["rounds"]:
            h = r.get("heldout") or {}
            lines.append(f"  classifier round {r['round']}: held-out P={h.get('precision')} R={h.get('recall')} "
                         f"AUC={h.get('auc')}")
    lines.append(f"  train shards: {sum(len(v) for v in s['train_shards'].values())} "
                 f"({len(s['train_shards'])} sources); eval: {', '.join(s['eval_shards'])}")
    return "\n".join(lines)
