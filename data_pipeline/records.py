"""On-disk records: atomic writes, JSONL, ArrayRecord shards, and the record codec.

Two record kinds live in ArrayRecord files:
  * text documents (the corpus): UTF-8 JSON `{"id", "text", "source", "lang", "label", "split"}`;
  * tokenized documents (prepared for training): msgpack `{"id", "source", "lang", "score", "tokens": int32 bytes,
    "mask": uint8 bytes (SFT only)}`. msgpack keeps the token bytes binary (JSON would triple them).
`decode_record` tells them apart by the first byte ('{' is never a msgpack map header).

Every writer writes to a temporary name in the target directory and renames it when complete, so a crash never
leaves a truncated file under a final name.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import msgpack
import numpy as np

SHARD_SUFFIX = ".array_record"


# ---------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds, delete it otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    """Write one JSON object per line (UTF-8, non-ASCII kept readable); returns the number of rows."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_figure(fig, path: str | Path, dpi: int = 110, title: str | None = None) -> Path:
    """Finish a matplotlib figure (`title` as its suptitle, tight layout), save it as PNG at `path` (parents created)
    atomically, and close it. Returns the path."""
    import matplotlib.pyplot as plt        # plotting is optional at import time: only figure writers pay for it
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------- codec
def encode_text_record(doc: dict) -> bytes:
    return json.dumps(doc, ensure_ascii=False).encode("utf-8")


def encode_token_record(tokens: np.ndarray, *, mask: np.ndarray | None = None, **meta) -> bytes:
    rec = dict(meta)
    rec["tokens"] = np.ascontiguousarray(tokens, dtype="<i4").tobytes()
    if mask is not None:
        rec["mask"] = np.ascontiguousarray(mask, dtype=np.uint8).tobytes()
    return msgpack.packb(rec, use_bin_type=True)


def document_token_record(doc: dict, ids, score: float) -> bytes:
    """The token record of a prepared document: its id, source and language, its quality score (5 decimals; left
    out when NaN, i.e. not scored) and its token ids. The one encoder of the local preparation and the Beam
    pipeline, so both write identical records for the same document."""
    rec = {"id": doc["id"], "source": doc["source"], "lang": doc["lang"]}
    if not np.isnan(score):
        rec["score"] = round(float(score), 5)
    return encode_token_record(np.asarray(ids, np.int32), **rec)


def decode_record(data: bytes) -> dict:
    """bytes -> dict; token records get `tokens` (int32 array) and, for SFT, `mask` (int32 array of 0/1)."""
    if data[:1] == b"{":
        return json.loads(data.decode("utf-8"))
    rec = msgpack.unpackb(data, raw=False)
    if not isinstance(rec, dict) or "tokens" not in rec:
        raise ValueError("record is neither a JSON document nor a msgpack token record")
    rec["tokens"] = np.frombuffer(rec["tokens"], dtype="<i4").astype(np.int32)
    if "mask" in rec:
        rec["mask"] = np.frombuffer(rec["mask"], dtype=np.uint8).astype(np.int32)
    return rec


# ---------------------------------------------------------------- ArrayRecord shards
def shard_name(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}{SHARD_SUFFIX}"


def shard_prefix(path: str | Path) -> str:
    """The prefix (source name) of a shard written by write_shards, or of a Parquet file: shard_name's inverse."""
    name = Path(path).name
    for suffix in (SHARD_SUFFIX, ".parquet"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name.split("-00")[0]


def write_shards(records: Iterable[bytes], out_dir: str | Path, prefix: str,
                 max_shard_bytes: int = 256 << 20) -> list[Path]:
    """Write serialized records to `<prefix>-XXXXX-of-YYYYY.array_record` shards of at most ~max_shard_bytes.

    `group_size:1` keeps every record its own chunk: random access for a global shuffle costs one read.
    Shards are written under temporary names and renamed once all are complete (the count is known only then).
    """
    from array_record.python.array_record_module import ArrayRecordWriter  # C extension, shards only

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmps: list[Path] = []
    writer, size = None, 0
    try:
        for rec in records:
            if writer is None or size >= max_shard_bytes:
                if writer is not None:
                    writer.close()
                tmps.append(out_dir / f".{prefix}-{len(tmps):05d}.tmp-{os.getpid()}")
                writer, size = ArrayRecordWriter(str(tmps[-1]), "group_size:1"), 0
            writer.write(rec)
            size += len(rec)
        if writer is not None:
            writer.close()
            writer = None
        finals = []
        for i, tmp in enumerate(tmps):
            final = out_dir / shard_name(prefix, i, len(tmps))
            os.replace(tmp, final)
            finals.append(final)
        return finals
    finally:
        if writer is not None:
            writer.close()
        for tmp in tmps:
            if tmp.exists():
                tmp.unlink()


def read_shards(paths: Sequence[str | Path]) -> Iterator[bytes]:
    """Every record of the shards, in order (sequential read, for offline passes)."""
    from array_record.python.array_record_module import ArrayRecordReader  # C extension, shards only

    for p in paths:
        reader = ArrayRecordReader(str(p))
        try:
            n = reader.num_records()
            step = 1024
            for start in range(0, n, step):
                yield from reader.read(list(range(start, min(n, start + step))))
        finally:
            reader.close()


def list_shards(directory: str | Path, prefix: str | None = None) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        return []
    pat = f"{prefix}-*{SHARD_SUFFIX}" if prefix else f"*{SHARD_SUFFIX}"
    return sorted(p for p in d.glob(pat) if not p.name.startswith("."))
