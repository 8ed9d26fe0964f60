"""Bad-input accounting: every dropped line or document is counted by file, line and reason, never raised.

A long corpus build or scoring pass meets malformed JSON, text that is not UTF-8, empty or huge documents and
records without a `text` field. Each is reported once (the first few per reason also as a warning), skipped, and
summarised at the end: how many were dropped and why.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any, Optional

from data_pipeline.records import write_jsonl

log = logging.getLogger("data_pipeline")

REASONS = {
    "bad_json": "line is not valid JSON",
    "bad_encoding": "bytes are not valid UTF-8 (or hold lone surrogates)",
    "not_an_object": "JSON value is not an object",
    "missing_field": "a required field is absent",
    "bad_field_type": "a field has the wrong type",
    "empty": "document text is empty or whitespace",
    "huge": "document is larger than max_input_doc_mb",
    "wrong_language": "text is not in the source's language",
    "read_error": "file could not be read",
    "bad_record": "ArrayRecord record could not be decoded",
    "duplicate_exact": "same normalised text as a document kept earlier (hash)",
    "duplicate_near": "MinHash-LSH near duplicate (estimated Jaccard >= threshold) of a document kept earlier",
    "low_quality": "UltraClean score below the threshold",
}


class DropReport:
    """Collects (file, line, reason, detail) for skipped input; `summary()` / `format()` at the end of a run."""

    def __init__(self, max_kept: int = 100_000, warn_per_reason: int = 5):
        self.counts: collections.Counter = collections.Counter()  # (file, reason) -> n
        self.kept: list[dict] = []
        self.max_kept = max_kept
        self.warn_per_reason = warn_per_reason
        self._warned: collections.Counter = collections.Counter()

    def drop(self, file: str | Path, line: Optional[int], reason: str, detail: str = "") -> None:
        """Record one skipped item. `line` is 1-based (a record index for binary files), or None for a whole file."""
        if reason not in REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; known: {sorted(REASONS)}")
        file = str(file)
        self.counts[(file, reason)] += 1
        if len(self.kept) < self.max_kept:
            self.kept.append({"file": file, "line": line, "reason": reason, "detail": detail[:300]})
        if self._warned[reason] < self.warn_per_reason:
            self._warned[reason] += 1
            where = f"{file}:{line}" if line is not None else file
            log.warning("skipped %s (%s)%s", where, reason, f": {detail[:200]}" if detail else "")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        by_reason: collections.Counter = collections.Counter()
        by_file: dict[str, dict[str, int]] = collections.defaultdict(dict)
        for (file, reason), n in sorted(self.counts.items()):
            by_reason[reason] += n
            by_file[file][reason] = n
        return {"dropped": self.total, "by_reason": dict(by_reason.most_common()), "by_file": dict(by_file)}

    def format(self) -> str:
        s = self.summary()
        if not s["dropped"]:
            return "bad input: none dropped"
        lines = [f"bad input: dropped {s['dropped']} item(s)"]
        for reason, n in s["by_reason"].items():
            lines.append(f"  {reason:15s} {n:8d}  ({REASONS[reason]})")
        for file, reasons in s["by_file"].items():
            lines.append(f"  {file}: " + ", ".join(f"{r}={n}" for r, n in reasons.items()))
        return "\n".join(lines)

    def write(self, path: str | Path) -> Path:
        """Write every kept drop as JSONL (file, line, reason, detail) for inspection."""
        write_jsonl(path, self.kept)
        return Path(path)
