"""The run's accounting: kept / dropped counts per reason and per source, the score histogram, bytes read; the
manifest of written shards. Built from PCollections inside the pipeline (`ReportParts`), finished by the driver
(timing: documents/s, MB/s), written as `report.json` and `manifest.json` through Beam's filesystems."""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

PARTS = "_report_parts.json"


def _add(a, b):
    return tuple(x + y for x, y in zip(a, b))


class SumTuples(beam.CombineFn):
    """Element-wise sum of fixed-length tuples (documents, bytes, tokens)."""

    def create_accumulator(self):
        return (0, 0, 0)

    def add_input(self, acc, x):
        return _add(acc, x)

    def merge_accumulators(self, accs):
        out = (0, 0, 0)
        for a in accs:
            out = _add(out, a)
        return out

    def extract_output(self, acc):
        return acc


def histogram_bin(score: float, bins: int) -> int:
    """Bin of a score in [0, 1] among `bins` equal bins (1.0 lands in the last)."""
    return min(bins - 1, max(0, int(score * bins)))


def write_json(path: str, obj) -> None:
    """JSON through Beam's filesystems (local or remote)."""
    with FileSystems.create(path) as f:
        f.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def read_json(path: str):
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return json.loads(f.read().decode("utf-8"))


class ReportParts(beam.PTransform):
    """Writes `<out>/_report_parts.json` once everything upstream is done: outcomes per (source, outcome), score
    histogram counts, shard summaries and bytes of the matched input files."""

    def __init__(self, out: str, bins: int):
        super().__init__()
        self.out = out
        self.bins = bins

    def expand(self, pcolls):
        kept, drops, scores, shards, files = pcolls
        bins = self.bins
        outcomes = ((kept | "KeptOutcome" >> beam.Map(lambda k: ((k[1], "kept"), (1, k[5], k[4]))),
                     drops | "DropOutcome" >> beam.Map(lambda d: ((d["source"], d["reason"]), (1, d["bytes"], 0))))
                    | "Outcomes" >> beam.Flatten() | "SumOutcomes" >> beam.CombinePerKey(SumTuples()))
        hist = (scores | "Bin" >> beam.Map(lambda s: histogram_bin(s[1], bins))
                | "CountBins" >> beam.combiners.Count.PerElement())
        input_bytes = files | "FileBytes" >> beam.Map(lambda f: f[1]) | "SumBytes" >> beam.CombineGlobally(sum)
        n_files = files | "CountFiles" >> beam.combiners.Count.Globally()
        out = self.out

        def write(_, outcomes, hist, shards, input_bytes, n_files):
            write_json(FileSystems.join(out, PARTS), {
                "outcomes": [[s, o, *v] for (s, o), v in sorted(outcomes)], "histogram": sorted(hist),
                "shards": sorted(shards, key=lambda s: s["path"]), "input_bytes": input_bytes[0] if input_bytes else 0,
                "input_files": n_files[0] if n_files else 0})

        return (files.pipeline | "Once" >> beam.Create([None])
                | "WriteParts" >> beam.Map(write, outcomes=beam.pvalue.AsList(outcomes),
                                           hist=beam.pvalue.AsList(hist), shards=beam.pvalue.AsList(shards),
                                           input_bytes=beam.pvalue.AsList(input_bytes),
                                           n_files=beam.pvalue.AsList(n_files)))


def finish_report(parts: dict, *, seconds: float, threshold: float, bins: int, config: dict, runner: str) -> dict:
    """report.json's content from the pipeline's parts and the driver's wall time."""
    per_source: dict = {}
    by_reason: dict = {}
    kept = dropped = 0
    for source, outcome, n, nbytes, ntok in parts["outcomes"]:
        s = per_source.setdefault(source, {"kept": 0, "kept_bytes": 0, "kept_tokens": 0, "dropped": {}})
        if outcome == "kept":
            s["kept"] += n
            s["kept_bytes"] += nbytes
            s["kept_tokens"] += ntok
            kept += n
        else:
            s["dropped"][outcome] = s["dropped"].get(outcome, 0) + n
            by_reason[outcome] = by_reason.get(outcome, 0) + n
            dropped += n
    counts = [0] * bins
    for b, n in parts["histogram"]:
        counts[b] = n
    docs = kept + dropped  # documents and dropped input items seen
    mb = parts["input_bytes"] / 1e6
    return {
        "kept": kept, "dropped": dropped, "dropped_by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
        "per_source": dict(sorted(per_source.items())), "threshold": threshold,
        "score_histogram": {"edges": [round(i / bins, 6) for i in range(bins + 1)], "counts": counts},
        "input_files": parts["input_files"], "bytes_processed": parts["input_bytes"],
        "seconds": round(seconds, 3), "documents_per_s": round(docs / seconds, 1) if seconds > 0 else None,
        "mb_per_s": round(mb / seconds, 3) if seconds > 0 else None, "runner": runner, "config": config,
        "tokens": sum(s["tokens"] for s in parts["shards"]),
    }


def manifest(parts: dict) -> dict:
    """manifest.json: shards per split and source (paths relative to the output directory) with their counts."""
    shards: dict = {}
    for s in parts["shards"]:
        shards.setdefault(s["split"], {}).setdefault(s["source"], []).append(s["path"])
    return {"format": "token records (records.document_token_record), ArrayRecord group_size:1",
            "shards": shards, "records": sum(s["records"] for s in parts["shards"]),
            "tokens": sum(s["tokens"] for s in parts["shards"])}
