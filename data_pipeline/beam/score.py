"""UltraClean scoring, threshold and tokenization, with the classifier and tokenizer loaded once per worker.

The classifier directory and the tokenizer may live on any Beam filesystem: `DoFn.setup` copies them to a local
temporary directory when they are not local paths (that is how they reach Dataflow / Flink / Spark workers: as
files staged next to the job, e.g. in gs://). Scores come from `QualityClassifier.score` and token ids from
`Tokenizer.encode_batch(..., add_bos=True, add_eos=True)`, the calls of the local preparation, and records from
`records.document_token_record`, so a document gets the same score and ids on either path (both are per-document:
batching does not change them).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from data_pipeline import records
from data_pipeline.beam.read import DROPPED, drop_row
from data_pipeline.classifier import QualityClassifier
from data_pipeline.tokenizer import Tokenizer

SCORES = "scores"  # tagged output: (source, score) of every scored document, kept or not (the histogram)


def _match(pattern: str) -> list:
    try:
        return FileSystems.match([pattern])[0].metadata_list
    except Exception:  # noqa: BLE001 - a missing path is "nothing matched" on every filesystem
        return []


def local_copy(path: str, into: str) -> str:
    """`path` itself when it is on this machine, else a copy of that file or directory (flat) under `into`."""
    if os.path.exists(path):
        return path
    name = Path(path.rstrip("/")).name
    inside = _match(path.rstrip("/") + "/*")
    files = inside or _match(path)
    if not files:
        raise FileNotFoundError(f"{path}: nothing to stage (no such file or directory on any Beam filesystem)")
    base = os.path.join(into, name) if inside else into
    os.makedirs(base, exist_ok=True)
    for m in files:
        with FileSystems.open(m.path, compression_type="uncompressed") as src, \
                open(os.path.join(base, Path(m.path).name), "wb") as dst:
            shutil.copyfileobj(src, dst)
    return os.path.join(into, name)


def load_models(classifier_dir: str, tokenizer_path: str, into: str) -> tuple[QualityClassifier, Tokenizer]:
    """The classifier and tokenizer, staged locally. A classifier whose recorded tokenizer path does not exist here
    (trained on another machine) uses the given tokenizer for its preprocessing."""
    tok_local = local_copy(tokenizer_path, into)
    clf = QualityClassifier.load(local_copy(classifier_dir, into))
    if clf.tokenization == "spm" and not (clf.tokenizer_path and os.path.exists(clf.tokenizer_path)):
        clf.tokenizer_path = tok_local
    return clf, Tokenizer.load(tok_local)


def check_tokenizer(path: str) -> None:
    """Fail before the pipeline starts, naming the setting, when the tokenizer path holds nothing."""
    if not (os.path.exists(path) or _match(path.rstrip("/") + "/tokenizer.*") or _match(path)):
        raise ValueError(f"process.tokenizer: {path} holds no tokenizer.model / tokenizer.json")


def read_threshold(classifier_dir: str, threshold: Optional[float]) -> float:
    """The given threshold, else the one the classifier was saved with (read through Beam's filesystems)."""
    if threshold is not None:
        return threshold
    import json

    path = classifier_dir.rstrip("/") + "/classifier.json"
    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            return float(json.loads(f.read().decode("utf-8"))["threshold"])
    except Exception as e:  # noqa: BLE001 - any filesystem or format error: name the setting and the file
        raise ValueError(f"process.classifier: cannot read {path} ({type(e).__name__}: {e}); give the directory "
                         "written by `minicpm data train-classifier`") from e


class ScoreAndTokenize(beam.DoFn):
    """batch of documents -> (split, source, uid, token record, tokens, text bytes) for each kept document;
    documents below the threshold -> DROPPED (low_quality); every score -> SCORES."""

    def __init__(self, classifier_dir: str, tokenizer_path: str, threshold: float):
        self.classifier_dir = classifier_dir
        self.tokenizer_path = tokenizer_path
        self.threshold = threshold
        self.kept = beam.metrics.Metrics.counter("process", "documents_kept")
        self.low = beam.metrics.Metrics.counter("process", "documents_low_quality")

    def setup(self):
        self._tmp = tempfile.mkdtemp(prefix="minicpm-beam-models-")
        self.clf, self.tok = load_models(self.classifier_dir, self.tokenizer_path, self._tmp)
        self.clf.score(["warm up"])  # load fastText and the preprocessor now, not inside the first bundle

    def teardown(self):
        shutil.rmtree(getattr(self, "_tmp", ""), ignore_errors=True)

    def process(self, docs):
        scores = self.clf.score([d["text"] for d in docs])
        kept = []
        for d, s in zip(docs, scores):
            yield beam.pvalue.TaggedOutput(SCORES, (d["source"], float(s)))
            if s >= self.threshold:
                kept.append((d, s))
            else:
                self.low.inc()
                yield beam.pvalue.TaggedOutput(DROPPED, drop_row(
                    d["file"], d["line"], "low_quality", f"score {float(s):.5f} < {self.threshold}",
                    source=d["source"], doc_id=d["id"], nbytes=len(d["text"].encode("utf-8"))))
        ids = self.tok.encode_batch([d["text"] for d, _ in kept], add_bos=True, add_eos=True)
        for (d, s), t in zip(kept, ids):
            self.kept.inc()
            yield (d["split"], d["source"], d["uid"], records.document_token_record(d, t, s), len(t),
                   len(d["text"].encode("utf-8")))
