"""Files -> corpus documents, with every unusable input sent to a dead-letter output under a named reason.

Inputs are paths or globs on any Beam filesystem (local, gs://, s3://, hdfs://; .gz / .bz2 / .zst compression
from the name). By format:
  * JSONL (.jsonl / .json / .ndjson): one document per line, checked by `corpus.parse_jsonl_line` (the local
    reader's own checks). Lines are read in bounded blocks, so a 50 MB line is skipped as "huge" without being
    held in memory whole.
  * Parquet (.parquet): one document per row, `text` column (plus optional id / source / lang / split), checked
    by `corpus.check_document`.
  * anything else: the whole file is one UTF-8 text document.
Documents are then split into corpus documents by `corpus.user_doc_pieces`, as `minicpm data build --inputs` does.
"""

from __future__ import annotations

import logging
import re
from pathlib import PurePosixPath
from typing import Iterator, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from data_pipeline import corpus as C
from data_pipeline.report import DropReport

log = logging.getLogger("data_pipeline")

DROPPED = "dropped"  # tag of the dead-letter output (dicts: file, line, source, id, reason, detail, bytes)
_COMPRESSION = (".gz", ".bz2", ".zst", ".deflate", ".lzma")
_JSONL = (".jsonl", ".json", ".ndjson")


def file_kind(path: str) -> str:
    """"jsonl", "parquet" or "text", from the name without its compression suffix."""
    name = path.lower()
    for suf in _COMPRESSION:
        if name.endswith(suf):
            name = name[: -len(suf)]
    if name.endswith(_JSONL):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") else "text"


def default_source(path: str) -> str:
    """Source name of a file's documents that carry none: `user_<stem>`, as the local corpus build names them."""
    name = PurePosixPath(path).name
    for suf in _COMPRESSION + _JSONL + (".parquet", ".txt"):
        if name.lower().endswith(suf):
            name = name[: -len(suf)]
    return "user_" + re.sub(r"\W+", "_", name)


def safe_source(name) -> str:
    """A document's own `source` field as a shard-name-safe prefix ("" when absent or not a string)."""
    return re.sub(r"[^\w.]+", "_", name) if isinstance(name, str) else ""


def drop_row(file: str, line: Optional[int], reason: str, detail: str = "", *, source: str = "",
             doc_id: Optional[str] = None, nbytes: int = 0) -> dict:
    """The dead-letter record every stage emits for an input it drops."""
    return {"file": file, "line": line, "source": source, "id": doc_id, "reason": reason, "detail": detail[:300],
            "bytes": nbytes}


def bounded_lines(fh, limit: int, block: int = 1 << 20) -> Iterator[tuple[int, Optional[bytes], int]]:
    """(1-based line number, line bytes or None when longer than `limit`, length) for each line of a binary file;
    a long line is counted while it streams past, never accumulated."""
    buf = bytearray()
    lineno, too_long, skipped = 0, False, 0
    while True:
        chunk = fh.read(block)
        if not chunk:
            break
        start = 0
        while True:
            i = chunk.find(b"\n", start)
            piece = chunk[start:] if i < 0 else chunk[start:i]
            if too_long:
                skipped += len(piece)
            else:
                buf += piece
                if len(buf) > limit:
                    too_long, skipped = True, len(buf)
                    buf = bytearray()
            if i < 0:
                break
            lineno += 1
            yield (lineno, None, skipped) if too_long else (lineno, bytes(buf), len(buf))
            buf, too_long, skipped = bytearray(), False, 0
            start = i + 1
    if too_long or buf:
        yield (lineno + 1, None, skipped) if too_long else (lineno + 1, bytes(buf), len(buf))


class MatchInputs(beam.DoFn):
    """pattern -> (path, size) of each matching file; a pattern that matches nothing or cannot be listed goes to
    the dead letters as read_error."""

    def process(self, pattern: str):
        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except Exception as e:  # noqa: BLE001 - any filesystem error is a reportable input problem
            yield beam.pvalue.TaggedOutput(DROPPED, drop_row(pattern, None, "read_error", f"cannot list: {e}"))
            return
        if not found:
            yield beam.pvalue.TaggedOutput(DROPPED, drop_row(pattern, None, "read_error", "no file matches"))
        for m in sorted(found, key=lambda m: m.path):
            yield m.path, m.size_in_bytes


class ReadDocuments(beam.DoFn):
    """(path, size) -> corpus documents {uid, id, source, lang, split, text, file, line}; dropped input -> the
    DROPPED output. `uid` (file, line, piece) orders documents for deterministic de-duplication."""

    def __init__(self, max_doc_bytes: int, max_doc_chars: int):
        self.max_doc_bytes = max_doc_bytes
        self.max_doc_chars = max_doc_chars
        self.files = beam.metrics.Metrics.counter("process", "files_read")
        self.docs = beam.metrics.Metrics.counter("process", "documents_read")
        self.bytes = beam.metrics.Metrics.counter("process", "bytes_read")
        self.drops = beam.metrics.Metrics.counter("process", "input_dropped")

    def process(self, element):
        path, size = element
        report = DropReport(warn_per_reason=0)  # collects this file's drops; drained into DROPPED as we go
        source = default_source(path)
        n_docs = 0
        try:
            fh = FileSystems.open(path)
        except Exception as e:  # noqa: BLE001 - unreadable file: report it and go on
            report.drop(path, None, "read_error", f"{type(e).__name__}: {e}")
            fh = None
        if fh is not None:
            try:
                docs = self._documents(fh, path, report)
                while True:
                    # only reading is guarded: downstream stages run inside our `yield` (fused), and their errors
                    # must not be mistaken for a corrupt file
                    try:
                        line, doc, nbytes = next(docs)
                    except StopIteration:
                        break
                    except Exception as e:  # noqa: BLE001 - corrupt / truncated file: keep what was read
                        report.drop(path, None, "read_error", f"{type(e).__name__}: {e}")
                        break
                    yield from self._drain(report, source)
                    for out in self._pieces(doc, path, line, source):
                        n_docs += 1
                        yield out
                    self.bytes.inc(nbytes)
            finally:
                fh.close()
        yield from self._drain(report, source)
        self.files.inc()
        self.docs.inc(n_docs)
        log.info("read %s: %d documents, %d bytes", path, n_docs, size)

    def _drain(self, report: DropReport, source: str):
        for k in report.kept:
            self.drops.inc()
            yield beam.pvalue.TaggedOutput(DROPPED, drop_row(k["file"], k["line"], k["reason"], k["detail"],
                                                             source=source))
        report.kept.clear()

    def _documents(self, fh, path: str, report: DropReport) -> Iterator[tuple[Optional[int], dict, int]]:
        kind = file_kind(path)
        if kind == "jsonl":
            for line, raw, n in bounded_lines(fh, self.max_doc_bytes * 2 + 1024):
                if raw is None:
                    report.drop(path, line, "huge", f"line of {n} bytes")
                    continue
                doc = C.parse_jsonl_line(raw, path, line, report, max_bytes=self.max_doc_bytes)
                if doc is not None:
                    yield line, doc, n
        elif kind == "parquet":
            import pyarrow.parquet as pq  # only for Parquet inputs

            row = 0
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=1024):
                for doc in batch.to_pylist():
                    row += 1
                    doc = C.check_document(doc, path, row, report, max_bytes=self.max_doc_bytes)
                    if doc is not None:
                        yield row, doc, len(doc["text"].encode("utf-8"))
        else:
            data = fh.read(self.max_doc_bytes + 1)
            if len(data) > self.max_doc_bytes:
                report.drop(path, None, "huge", f"file larger than {self.max_doc_bytes} bytes")
                return
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                report.drop(path, data[: e.start].count(b"\n") + 1, "bad_encoding",
                            f"byte 0x{data[e.start]:02x} at offset {e.start}")
                return
            doc = C.check_document({"text": text}, path, None, report, max_bytes=self.max_doc_bytes)
            if doc is not None:
                yield None, doc, len(data)

    def _pieces(self, doc: dict, path: str, line: Optional[int], source: str) -> Iterator[dict]:
        base = doc["id"] if isinstance(doc.get("id"), str) else f"{source}:{line or 0}"
        pieces = C.user_doc_pieces(doc, f"{path}:{line}", self.max_doc_chars)
        for k, p in enumerate(pieces):
            yield {"uid": f"{path}\t{line or 0:012d}\t{k:06d}",
                   "id": base if len(pieces) == 1 else f"{base}#{k}",
                   "source": safe_source(doc.get("source")) or source,
                   "lang": p["lang"], "split": doc["split"] if doc.get("split") in ("train", "eval") else "train",
                   "text": p["text"], "file": path, "line": line}
