"""The `minicpm data process` pipeline and its driver: `run_process(cfg, beam_args) -> report`.

    patterns -> MatchInputs -> Reshuffle -> ReadDocuments -> ExactDedup -> NearDedup -> BatchElements
             -> ScoreAndTokenize -> WriteTokenShards
    dead letters of every stage (tagged outputs) -> drops-*.jsonl and the report's counts

Beam options (`beam_args`, e.g. `--runner=DataflowRunner --project=... --region=... --temp_location=gs://...`) go
to PipelineOptions unchanged; the default is the DirectRunner in-process (`--direct_num_workers=N
--direct_running_mode=multi_processing` for worker processes).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from data_pipeline.beam.config import ProcessConfig
from data_pipeline.beam.dedup import ExactDedup, NearDedup
from data_pipeline.beam.read import DROPPED, MatchInputs, ReadDocuments
from data_pipeline.beam.report import PARTS, ReportParts, finish_report, manifest, read_json, write_json
from data_pipeline.beam.score import SCORES, ScoreAndTokenize, check_tokenizer, read_threshold
from data_pipeline.beam.write import WriteTokenShards

log = logging.getLogger("data_pipeline")


def build(p: beam.Pipeline, cfg: ProcessConfig, threshold: float) -> None:
    """Add the whole preparation to pipeline `p` (outputs under cfg.out)."""
    matched = (p | "Patterns" >> beam.Create(list(cfg.inputs))
               | "Match" >> beam.ParDo(MatchInputs()).with_outputs(DROPPED, main="files"))
    files = matched.files
    read = (files | "SpreadFiles" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(ReadDocuments(cfg.max_doc_bytes, cfg.max_doc_chars)).with_outputs(
                DROPPED, main="docs"))
    drops = [matched[DROPPED], read[DROPPED]]
    docs = read.docs
    if cfg.dedup.exact:
        exact = docs | "ExactDedup" >> ExactDedup()
        docs, drops = exact.docs, drops + [exact[DROPPED]]
    if cfg.dedup.near:
        near = docs | "NearDedup" >> NearDedup(cfg.dedup)
        docs, drops = near.docs, drops + [near[DROPPED]]
    scored = (docs | "Batch" >> beam.BatchElements(min_batch_size=32, max_batch_size=512)
              | "ScoreAndTokenize" >> beam.ParDo(ScoreAndTokenize(cfg.classifier, cfg.tokenizer, threshold))
              .with_outputs(DROPPED, SCORES, main="kept"))
    drops = drops + [scored[DROPPED]]
    shards = scored.kept | "WriteShards" >> WriteTokenShards(cfg.out, int(cfg.target_shard_mb * 1e6))
    all_drops = drops | "AllDrops" >> beam.Flatten()
    (all_drops | "DropsJson" >> beam.Map(lambda d: json.dumps(d, ensure_ascii=False))
     | "WriteDrops" >> beam.io.WriteToText(FileSystems.join(cfg.out, "drops"), file_name_suffix=".jsonl"))
    _ = (scored.kept, all_drops, scored[SCORES], shards, files) | "Report" >> ReportParts(cfg.out, cfg.score_hist_bins)


def _check_out(out: str, overwrite: bool) -> None:
    existing = [m.path for m in _match(FileSystems.join(out, "*"))]
    if existing and not overwrite:
        raise ValueError(f"--out {out} is not empty ({len(existing)} entries); pass --overwrite or another directory")
    if existing:
        FileSystems.delete(existing)


def _match(pattern: str) -> list:
    try:
        return FileSystems.match([pattern])[0].metadata_list
    except Exception:  # noqa: BLE001 - nothing there
        return []


def run_process(cfg: ProcessConfig, beam_args: Sequence[str] = (), *, overwrite: bool = False,
                progress: bool = True) -> dict:
    """Run the pipeline (DirectRunner unless beam_args name another runner) and wait for it; write report.json and
    manifest.json beside the shards; return the report."""
    beam_args = list(beam_args)
    if not any(a.startswith("--default_sdk_harness_log_level") for a in beam_args):
        # worker processes log their start-up at INFO by the screenful; keep our per-file progress lines
        beam_args += ["--default_sdk_harness_log_level=WARNING",
                      '--sdk_harness_log_level_overrides={"data_pipeline": "INFO"}']
    opts = PipelineOptions(beam_args)
    if not opts.view_as(StandardOptions).runner:
        opts.view_as(StandardOptions).runner = "DirectRunner"
    runner = opts.view_as(StandardOptions).runner
    threshold = read_threshold(cfg.classifier, cfg.threshold)
    check_tokenizer(cfg.tokenizer)
    _check_out(cfg.out, overwrite)
    if runner == "DirectRunner":  # worker processes (multi_processing) must import this package too
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if root not in path:
            os.environ["PYTHONPATH"] = os.pathsep.join([root] + path)
    t0 = time.perf_counter()
    p = beam.Pipeline(options=opts)
    build(p, cfg, threshold)
    result = p.run()
    result.wait_until_finish()
    seconds = time.perf_counter() - t0
    parts = read_json(FileSystems.join(cfg.out, PARTS))
    direct = opts.view_as(DirectOptions)
    report = finish_report(parts, seconds=seconds, threshold=threshold, bins=cfg.score_hist_bins,
                           config=dataclasses.asdict(cfg), runner=runner)
    report["workers"] = direct.direct_num_workers if runner == "DirectRunner" else None
    report["counters"] = counters(result) if progress else {}
    write_json(FileSystems.join(cfg.out, "report.json"), report)
    write_json(FileSystems.join(cfg.out, "manifest.json"), manifest(parts))
    FileSystems.delete([FileSystems.join(cfg.out, PARTS)])
    return report


def counters(result) -> dict:
    """The pipeline's Beam counters (files / documents read, kept, low quality), where the runner reports them."""
    try:
        found = result.metrics().query(beam.metrics.MetricsFilter().with_namespace("process"))["counters"]
    except Exception:  # noqa: BLE001 - not every runner reports metrics
        return {}
    return {c.key.metric.name: c.committed if c.committed is not None else c.attempted for c in found}


def format_report(report: dict, out: str) -> str:
    """Human-readable lines for the command line."""
    lines = [f"processed {report['input_files']} file(s), {report['bytes_processed'] / 1e6:.2f} MB in "
             f"{report['seconds']:.1f} s ({report['documents_per_s']} docs/s, {report['mb_per_s']} MB/s, "
             f"runner {report['runner']})",
             f"kept {report['kept']} documents ({report['tokens']} tokens) at threshold {report['threshold']}; "
             f"dropped {report['dropped']}" + "".join(
                 f"{', ' if i else ': '}{k}={v}" for i, (k, v) in enumerate(report["dropped_by_reason"].items()))]
    for name, s in report["per_source"].items():
        lines.append(f"  {name:24s} kept {s['kept']:7d}  " + ", ".join(f"{k}={v}" for k, v in s["dropped"].items()))
    h = report["score_histogram"]["counts"]
    lines.append("score histogram (%d bins over [0, 1]): %s" % (len(h), " ".join(str(c) for c in h)))
    lines.append(f"outputs: {out} (train/, eval/ token shards; manifest.json, report.json, drops-*.jsonl)")
    return "\n".join(lines)


def process_inputs(inputs: Sequence[str], out: str, classifier: str, tokenizer: str,
                   beam_args: Sequence[str] = (), overwrite: bool = False, **fields) -> dict:
    """Convenience: ProcessConfig from arguments, then run_process."""
    return run_process(ProcessConfig(inputs=tuple(inputs), out=out, classifier=classifier, tokenizer=tokenizer,
                                     **fields), beam_args, overwrite=overwrite)


