"""`minicpm data score`: score documents with a trained UltraClean classifier and mark the ones to keep.

Input: JSONL files of {"text", ...} (malformed lines are reported by file and line and skipped) or a built corpus
directory. Output: JSONL with every input field plus "score" (P(high quality)) and "keep" (score >= threshold).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from data_pipeline import corpus as C
from data_pipeline import records
from data_pipeline.classifier import QualityClassifier
from data_pipeline.report import DropReport


def _docs(inputs: Sequence[str | Path], report: DropReport, max_bytes: int) -> Iterator[dict]:
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            yield from C.iter_docs(p)
        else:
            for _, d in C.iter_jsonl_docs(p, report, max_bytes=max_bytes):
                yield d


def score_files(inputs: Sequence[str | Path], classifier_dir: str | Path, out_path: str | Path, *,
                threshold: Optional[float] = None, report: Optional[DropReport] = None,
                max_doc_mb: float = 8.0, batch: int = 2048) -> dict:
    """Score every document of `inputs` into `out_path` (JSONL); return counts, kept share and docs/s."""
    clf = QualityClassifier.load(classifier_dir)
    thr = clf.threshold if threshold is None else threshold
    report = report if report is not None else DropReport()
    t0 = time.time()
    n = kept = 0
    buf: list[dict] = []

    def rows() -> Iterator[dict]:
        nonlocal n, kept
        for d in _docs(inputs, report, int(max_doc_mb * 1e6)):
            buf.append(d)
            if len(buf) >= batch:
                yield from flush()
        yield from flush()

    def flush() -> Iterator[dict]:
        nonlocal n, kept
        if not buf:
            return
        s = clf.score([d["text"] for d in buf])
        for d, x in zip(buf, s):
            d = dict(d, score=round(float(x), 5), keep=bool(x >= thr))
            n += 1
            kept += d["keep"]
            yield d
        buf.clear()

    records.write_jsonl(out_path, rows())
    dt = time.time() - t0
    return {"docs": n, "kept": kept, "kept_share": round(kept / n, 4) if n else None, "threshold": thr,
            "docs_per_s": round(n / dt, 1) if dt > 0 else None, "output": str(out_path), "dropped": report.summary()}
