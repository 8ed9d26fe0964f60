"""`minicpm bench data`'s Beam rows: documents/s and MB/s of `minicpm data process` on the DirectRunner with 1 and
2 workers against the local single-process path on the same input, measured in one run.

The local path is the same per-document work in one process, without de-duplication (the local preparation has
none): read with corpus.iter_jsonl_docs + user_doc_pieces, QualityClassifier.score, Tokenizer.encode_batch,
records.document_token_record, records.write_shards. Beam rows: in-process (in_memory), then worker processes
(multi_processing) with 1 and 2 workers, all with dedup, plus one in-process row without dedup (the like-for-like
comparison with the local path). Wall time includes the runner's start-up, as a user sees it.
"""

from __future__ import annotations

import collections
import glob
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from data_pipeline import corpus as C
from data_pipeline import records
from data_pipeline.beam.config import DedupConfig, ProcessConfig
from data_pipeline.beam.run import run_process
from data_pipeline.classifier import QualityClassifier
from data_pipeline.report import DropReport
from data_pipeline.tokenizer import Tokenizer


def local_process(inputs: Sequence[str], classifier_dir: str, tokenizer_dir: str, out: str,
                  threshold: float, max_doc_chars: int = 4000, max_doc_mb: float = 8.0) -> dict:
    """The local single-process equivalent of `data process` (no dedup) on JSONL files; returns docs, seconds."""
    t0 = time.perf_counter()
    clf, tok = QualityClassifier.load(classifier_dir), Tokenizer.load(tokenizer_dir)
    report = DropReport(warn_per_reason=0)
    docs = []
    for p in inputs:
        for line, d in C.iter_jsonl_docs(p, report, max_bytes=int(max_doc_mb * 1e6)):
            for piece in C.user_doc_pieces(d, f"{p}:{line}", max_doc_chars):
                docs.append({"id": d.get("id", f"{p}:{line}"), "source": d.get("source", "user"),
                             "lang": piece["lang"], "text": piece["text"]})
    scores = clf.score([d["text"] for d in docs])
    kept = [(d, s) for d, s in zip(docs, scores) if s >= threshold]
    by_source = collections.defaultdict(list)
    for (d, s), ids in zip(kept, tok.encode_batch([d["text"] for d, _ in kept], add_bos=True, add_eos=True)):
        by_source[d["source"]].append(records.document_token_record(d, ids, s))
    for name, recs in by_source.items():
        records.write_shards(recs, Path(out) / "train", name)
    return {"docs": len(docs) + report.total, "kept": len(kept), "seconds": time.perf_counter() - t0}


def bench_beam(inputs: Sequence[str], classifier_dir: str, tokenizer_dir: str, out_root: str | Path,
               workers: Sequence[int] = (1, 2)) -> list[dict]:
    """Rows {path, workers, docs, kept, seconds, docs_per_s, mb_per_s} for the local path and the Beam settings."""
    out_root = Path(out_root)
    shutil.rmtree(out_root, ignore_errors=True)
    mb = sum(os.path.getsize(p) for p in inputs) / 1e6
    threshold = QualityClassifier.load(classifier_dir).threshold
    rows = []

    def row(path: str, w, docs: int, kept: int, seconds: float) -> None:
        rows.append({"path": path, "workers": w, "docs": docs, "kept": kept, "seconds": seconds,
                     "docs_per_s": docs / seconds, "mb_per_s": mb / seconds})

    r = local_process(inputs, classifier_dir, tokenizer_dir, str(out_root / "local"), threshold)
    row("local (1 process, no dedup)", 1, r["docs"], r["kept"], r["seconds"])
    base = ProcessConfig(inputs=tuple(inputs), out=str(out_root), classifier=classifier_dir, tokenizer=tokenizer_dir)
    settings = [("beam in-process, no dedup", 1, [], DedupConfig(exact=False, near=False)),
                ("beam in-process", 1, [], DedupConfig())]
    settings += [(f"beam {w} worker process{'es' if w > 1 else ''}", w,
                  [f"--direct_num_workers={w}", "--direct_running_mode=multi_processing"], DedupConfig())
                 for w in workers]
    for i, (name, w, args, dedup) in enumerate(settings):
        rep = run_process(base.replace(out=str(out_root / f"beam{i}"), dedup=dedup), args, progress=False)
        row(name, w, rep["kept"] + rep["dropped"], rep["kept"], rep["seconds"])
    return rows


def print_rows(rows: list[dict]) -> None:
    """The table, with ratios to the local path and between worker counts."""
    local = rows[0]
    print("\n| preparation path | workers | docs | kept | s | docs/s | MB/s | time per doc vs local |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['workers']} | {r['docs']} | {r['kept']} | {r['seconds']:.1f} | "
              f"{r['docs_per_s']:,.0f} | {r['mb_per_s']:.2f} | {local['docs_per_s'] / r['docs_per_s']:.2f}x |")
    procs = {r["workers"]: r for r in rows if "worker process" in r["path"]}
    if 1 in procs and 2 in procs:
        print(f"\nBeam 2 worker processes / 1: {procs[2]['docs_per_s'] / procs[1]['docs_per_s']:.2f}x docs/s")


def default_inputs(prepared_workdir: str | Path) -> list[str]:
    """The prepared corpus's JSONL files (every source)."""
    return sorted(glob.glob(str(Path(prepared_workdir) / "corpus" / "jsonl" / "*.jsonl")))
