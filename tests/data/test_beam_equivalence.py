"""`minicpm data process` (Beam, DirectRunner) keeps the documents the in-process preparation keeps at the same
threshold, with the same scores and token ids; with 2 worker processes it writes the same shards as with 1."""

from __future__ import annotations

import filecmp
import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.data.beam_helpers import beam_drops, beam_records, local_records, run_beam

REPO = Path(__file__).resolve().parents[2]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _jaccard(a: str, b: str, n: int = 5) -> float:
    """Jaccard similarity of word n-gram sets: the test's own measure, independent of datasketch."""
    sa = {tuple(w[i:i + n]) for w in [_words(a)] for i in range(max(1, len(w) - n + 1))}
    sb = {tuple(w[i:i + n]) for w in [_words(b)] for i in range(max(1, len(w) - n + 1))}
    return len(sa & sb) / max(1, len(sa | sb))


def test_same_documents_scores_and_token_ids_as_local(prepared, data_cfg, tmp_path):
    corpus = prepared.workdir / "corpus"
    texts = {}
    for p in glob.glob(f"{corpus}/jsonl/*.jsonl"):
        import json
        for line in open(p, encoding="utf-8"):
            d = json.loads(line)
            texts[d["id"]] = d["text"]
    threshold = prepared.classifier().threshold
    local = {i: r for i, r in local_records(prepared).items() if r["score"] >= threshold}
    report = run_beam(prepared, [f"{corpus}/jsonl/*.jsonl"], tmp_path / "out")
    beam = beam_records(tmp_path / "out")
    drops = beam_drops(tmp_path / "out")
    dup = {d["id"]: d for d in drops if d["reason"].startswith("duplicate_")}
    assert len(local) > 500 and len(beam) > 500
    # everything the local path keeps is kept by Beam unless Beam reports it as a duplicate ...
    assert set(local) - set(dup) == set(beam)
    # ... and each reported duplicate really is one (the test's own normalisation and Jaccard)
    for i, d in dup.items():
        other = re.search(r"(?:as|with) (\S+)$", d["detail"]).group(1)
        if d["reason"] == "duplicate_exact":
            assert _words(texts[i]) == _words(texts[other]), (i, other)
        else:
            assert _jaccard(texts[i], texts[other]) >= 0.6, (i, other, d["detail"])
    for i, r in beam.items():
        assert r["score"] == local[i]["score"], i
        np.testing.assert_array_equal(r["tokens"], local[i]["tokens"], err_msg=i)
        assert (r["source"], r["lang"]) == (local[i]["source"], local[i]["lang"])
        assert r["shard"].split("/")[1].startswith(r["source"] + "-")
    assert report["kept"] == len(beam) and report["tokens"] == sum(len(r["tokens"]) for r in beam.values())
    # documents dropped below the threshold are exactly the local path's below-threshold ones (minus duplicates)
    low = {d["id"] for d in drops if d["reason"] == "low_quality"}
    local_low = {i for i, r in local_records(prepared).items() if r["score"] < threshold}
    assert low == local_low - set(dup)
    assert sum(report["score_histogram"]["counts"]) == len(beam) + len(low)
    # the training pipeline reads the shards unchanged, as a mixture component of paths
    from data_pipeline.pipeline import make_train_iterator
    from tests.data.conftest import take_all

    cfg = data_cfg.replace(mixture=({"name": "beam", "weight": 1.0, "sources": [f"{tmp_path}/out/train/*.array_record"]},))
    batches = take_all(make_train_iterator(prepared, cfg, process_index=0, process_count=1, num_epochs=1))
    n_train = sum(len(r["tokens"]) for r in beam.values() if r["shard"].startswith("train/"))
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == n_train


def test_two_worker_processes_write_the_same_shards_as_one(prepared, tmp_path):
    corpus = prepared.workdir / "corpus" / "jsonl"
    inputs = [corpus / "wiki_en.jsonl", corpus / "reviews_zh.jsonl", corpus / "package_licences.jsonl"]
    one = run_beam(prepared, inputs, tmp_path / "one")
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the worker processes import the pipeline's modules
    r = subprocess.run([sys.executable, "-m", "minicpm_jax.cli", "data", "process", *map(str, inputs),
                        "--out", str(tmp_path / "two"), "--classifier", str(prepared.classifier_dir),
                        "--tokenizer", str(prepared.tokenizer_dir), "--direct-num-workers", "2",
                        "--direct-running-mode", "multi_processing"], env=env, capture_output=True, text=True,
                       timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"kept {one['kept']} documents" in r.stdout
    shards = sorted(str(Path(p).relative_to(tmp_path / "one")) for p in glob.glob(f"{tmp_path}/one/*/*.array_record"))
    assert shards and shards == sorted(str(Path(p).relative_to(tmp_path / "two"))
                                       for p in glob.glob(f"{tmp_path}/two/*/*.array_record"))
    for s in shards:  # byte-identical: shard assignment and order within a shard do not depend on the workers
        assert filecmp.cmp(tmp_path / "one" / s, tmp_path / "two" / s, shallow=False), s
    two = __import__("json").loads((tmp_path / "two" / "report.json").read_text())
    for k in ("kept", "dropped", "dropped_by_reason", "per_source", "score_histogram", "tokens", "bytes_processed"):
        assert two[k] == one[k], k
    assert two["workers"] == 2 and one["workers"] in (None, 1)
