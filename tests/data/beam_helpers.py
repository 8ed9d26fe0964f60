"""Shared by the Beam tests: run `minicpm data process` in-process on the DirectRunner and read its outputs back
with the plain ArrayRecord reader (not the pipeline's code)."""

from __future__ import annotations

import glob
import json
from pathlib import Path

from data_pipeline import records


def run_beam(prepared, inputs, out, beam_args=(), **fields) -> dict:
    from data_pipeline.beam.config import ProcessConfig
    from data_pipeline.beam.run import run_process

    fields = {"classifier": str(prepared.classifier_dir), "tokenizer": str(prepared.tokenizer_dir), **fields}
    cfg = ProcessConfig(inputs=tuple(str(i) for i in inputs), out=str(out), **fields)
    return run_process(cfg, list(beam_args), progress=False)


def beam_records(out) -> dict[str, dict]:
    """id -> decoded token record, over every shard the run wrote (any split)."""
    recs = {}
    for p in sorted(glob.glob(f"{out}/*/*{records.SHARD_SUFFIX}")):
        for raw in records.read_shards([p]):
            r = records.decode_record(raw)
            assert r["id"] not in recs, f"{r['id']} written twice"
            r["shard"] = str(Path(p).relative_to(out))
            recs[r["id"]] = r
    return recs


def beam_drops(out) -> list[dict]:
    return [json.loads(line) for p in sorted(glob.glob(f"{out}/drops-*.jsonl")) for line in open(p, encoding="utf-8")]


def local_records(prepared) -> dict[str, dict]:
    """id -> token record of the in-process preparation: every shard it wrote (train and eval, held-out raw sources
    included, which PreparedData.shards leaves out)."""
    out = {}
    for split in ("train", "eval"):
        for raw in records.read_shards(records.list_shards(Path(prepared.workdir) / "tokens" / split)):
            r = records.decode_record(raw)
            out[r["id"]] = r
    return out
