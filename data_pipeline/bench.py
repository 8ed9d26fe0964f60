"""`minicpm bench data`: is the input pipeline ever the bottleneck of the main job?

Measured in one run on a prepared workdir:
  * scoring: docs/s of the Python preprocessing (clean + SentencePiece pieces), of fastText prediction alone, and
    end to end, with the preprocessing share of the time;
  * the grain pipeline, tokens/s (non-padding) with 0 (in-process), 1 and 2 worker processes, for the main job's
    path (token shards -> filter -> pack -> batch) and the full path (text shards -> score -> filter -> tokenize
    -> pack -> batch);
  * beside them the tokens/s the tiny train step consumes at the same batch and sequence length (given by the
    caller: the experiments script and the main CLI measure it with minicpm_jax; this package never imports it),
    and the ratio pipeline / train step (> 1 means the pipeline keeps up).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Callable, Optional

from data_pipeline import corpus as C
from data_pipeline.config import DataConfig
from data_pipeline.debian import default_cache_dir
from data_pipeline.pipeline import make_train_iterator
from data_pipeline.prepare import PreparedData


def bench_scoring(prepared: PreparedData, max_docs: int = 4000) -> dict:
    clf = prepared.classifier()
    texts = [d["text"] for d in C.iter_docs(prepared.workdir / "corpus")]
    texts = texts[:: max(1, len(texts) // max_docs)][:max_docs]  # every source, not the first one only
    clf.score(texts[:10])  # load model and tokenizer outside the timing
    t0 = time.perf_counter()
    lines = clf.preprocess.many(texts)
    t1 = time.perf_counter()
    clf.predict_lines(lines)
    t2 = time.perf_counter()
    pre, pred = t1 - t0, t2 - t1
    return {"docs": len(texts), "mb": sum(len(t.encode()) for t in texts) / 1e6,
            "preprocess_docs_per_s": len(texts) / pre, "predict_docs_per_s": len(texts) / pred,
            "end_to_end_docs_per_s": len(texts) / (pre + pred), "preprocess_share": pre / (pre + pred)}


def _measure(it, seconds: float, min_batches: int = 5) -> tuple[float, float, float]:
    """(tokens/s, padding share, first-batch latency) of an iterator, after its first batch."""
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    n = real = slots = 0
    t0 = time.perf_counter()
    while n < min_batches or time.perf_counter() - t0 < seconds:
        b = next(it)
        real += int((b["segment_ids"] > 0).sum())
        slots += b["segment_ids"].size
        n += 1
    dt = time.perf_counter() - t0
    return real / dt, 1 - real / max(slots, 1), first


def bench_pipeline(prepared: PreparedData, cfg: DataConfig, workers=(0, 1, 2), seconds: float = 4.0) -> list[dict]:
    corpus_shards: dict[str, list[str]] = {}
    man = C.load_manifest(prepared.workdir / "corpus")
    for name, m in man["sources"].items():
        if m["split_docs"].get("train") and not m.get("heldout"):
            corpus_shards[name] = [str(prepared.workdir / "corpus" / s) for s in m["shards"]]
    rows = []
    for path_name, inputs in (("tokens", prepared), ("text", corpus_shards)):
        for w in workers:
            c = dataclasses.replace(cfg, num_workers=w, tokenizer=dataclasses.replace(
                cfg.tokenizer, path=str(prepared.tokenizer_dir)))
            it = make_train_iterator(inputs, c, process_index=0, process_count=1,
                                     classifier=prepared.classifier_dir if path_name == "text" else None)
            tps, pad, first = _measure(it, seconds)
            if hasattr(it, "close"):
                it.close()
            rows.append({"path": path_name, "workers": w, "tokens_per_s": tps, "padding": pad, "first_batch_s": first})
    return rows


def run(prepared: PreparedData, cfg: DataConfig, *, train_tokens_per_s: Optional[float] = None,
        train_step: Optional[Callable[[int, int], float]] = None, workers=(0, 1, 2), seconds: float = 4.0) -> dict:
    """Run every measurement and print the table; returns the numbers."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPUs, load average {load:.2f}; batch {cfg.batch_size} x seq_len {cfg.seq_len}")
    sc = bench_scoring(prepared)
    print(f"\nscoring ({sc['docs']} docs, {sc['mb']:.1f} MB):")
    mb_per_doc = sc["mb"] / sc["docs"]
    for label, key in (("Python preprocessing", "preprocess_docs_per_s"), ("fastText predict", "predict_docs_per_s"),
                       ("end to end", "end_to_end_docs_per_s")):
        print(f"  {label:22s}{sc[key]:9,.0f} docs/s  {sc[key] * mb_per_doc:6.1f} MB/s")
    print(f"  (preprocessing is {100 * sc['preprocess_share']:.0f}% of the scoring time)")
    rows = bench_pipeline(prepared, cfg, workers, seconds)
    if train_tokens_per_s is None and train_step is not None:
        train_tokens_per_s = train_step(cfg.batch_size, cfg.seq_len)
    print("\n| pipeline path | workers | tokens/s | padding | first batch (s) | pipeline / train step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / train_tokens_per_s:,.1f}x" if train_tokens_per_s else "n/a"
        r["ratio_to_train"] = r["tokens_per_s"] / train_tokens_per_s if train_tokens_per_s else None
        print(f"| {r['path']} | {r['workers']} | {r['tokens_per_s']:,.0f} | {100 * r['padding']:.1f}% | "
              f"{r['first_batch_s']:.2f} | {ratio} |")
    if train_tokens_per_s:
        print(f"| tiny train step | - | {train_tokens_per_s:,.0f} | - | - | 1.0x |")
        worst = min(r["tokens_per_s"] for r in rows if r["path"] == "tokens")
        verdict = "never the bottleneck" if worst > train_tokens_per_s else "THE BOTTLENECK"
        print(f"\nmain-job path (token shards), slowest setting: {worst / train_tokens_per_s:,.1f}x the train step: "
              f"the pipeline is {verdict}")
    else:
        print("\ntrain step not measured (pass --train-tokens-per-s, or run `minicpm bench data`)")
    return {"scoring": sc, "pipeline": rows, "train_tokens_per_s": train_tokens_per_s}


def default_workdir() -> Path:
    return default_cache_dir() / "bench-data"


def summary_numbers(result: dict) -> dict:
    return {"scoring_docs_per_s": round(result["scoring"]["end_to_end_docs_per_s"]),
            "pipeline_tokens_per_s": {f"{r['path']}/{r['workers']}": round(r["tokens_per_s"])
                                      for r in result["pipeline"]},
            "train_tokens_per_s": result["train_tokens_per_s"]}
