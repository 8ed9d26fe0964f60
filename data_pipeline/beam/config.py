"""ProcessConfig: what `minicpm data process` reads, how it de-duplicates and filters, where it writes.

Frozen dataclasses validated when built; a wrong value fails with the field's name (`process.dedup.jaccard: ...`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"process.{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    """Exact (hash of the normalised text) and near-duplicate (MinHash LSH) removal.

    Near duplicates: MinHash over `shingle`-grams of the normaliser's word tokens (one token per CJK character, so
    Chinese works too); documents sharing one LSH band are candidates, and a candidate is dropped when its
    estimated Jaccard similarity to an earlier document (smaller key) is >= `jaccard`. `bands` x `rows` <=
    `num_perm`; bands=None lets datasketch pick them for `jaccard` (its false positive / negative optimiser).
    """

    exact: bool = True
    near: bool = True
    jaccard: float = 0.8
    num_perm: int = 128
    bands: Optional[int] = None
    shingle: int = 5
    seed: int = 1
    max_bucket_compare: int = 200  # a document is compared with at most this many earlier ones per band bucket

    def __post_init__(self):
        _check(0.0 < self.jaccard <= 1.0, "dedup.jaccard", f"must be in (0, 1], got {self.jaccard!r}")
        for f in ("num_perm", "shingle", "max_bucket_compare"):
            v = getattr(self, f)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"dedup.{f}",
                   f"must be an integer >= 1, got {v!r}")
        if self.bands is not None:
            _check(isinstance(self.bands, int) and 1 <= self.bands <= self.num_perm, "dedup.bands",
                   f"must be an integer in [1, num_perm={self.num_perm}] or None, got {self.bands!r}")

    def band_rows(self) -> tuple[int, int]:
        """(bands, rows per band): the given bands, or datasketch's optimum for the threshold."""
        if self.bands is not None:
            return self.bands, self.num_perm // self.bands
        from datasketch.lsh import _optimal_param  # the parameters MinHashLSH itself would choose

        return _optimal_param(self.jaccard, self.num_perm, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class ProcessConfig:
    """Inputs (paths or globs on any Beam filesystem), the trained classifier and tokenizer directories, the output
    directory, and the filtering knobs."""

    inputs: Tuple[str, ...]
    out: str
    classifier: str  # directory of a trained classifier (classifier.json + model)
    tokenizer: str  # directory (or tokenizer.model / tokenizer.json file) of the run's tokenizer
    threshold: Optional[float] = None  # keep score >= threshold; None = the classifier's own
    max_doc_mb: float = 8.0  # larger documents (and JSONL lines) are dropped as "huge", never read whole
    max_doc_chars: int = 4000  # longer documents are split into pieces (as `data build --inputs` does)
    score_hist_bins: int = 20
    target_shard_mb: float = 256.0  # token bytes per output shard (shards per source = ceil(bytes / this))
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig)

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple([self.inputs] if isinstance(self.inputs, str) else self.inputs))
        _check(len(self.inputs) > 0, "inputs", "name at least one file or glob")
        for f in ("out", "classifier", "tokenizer"):
            _check(isinstance(getattr(self, f), str) and bool(getattr(self, f)), f, "must be a non-empty path")
        if self.threshold is not None:
            _check(0.0 <= self.threshold <= 1.0, "threshold", f"must be in [0, 1], got {self.threshold!r}")
        _check(self.max_doc_mb > 0, "max_doc_mb", f"must be > 0, got {self.max_doc_mb!r}")
        _check(self.target_shard_mb > 0, "target_shard_mb", f"must be > 0, got {self.target_shard_mb!r}")
        for f in ("max_doc_chars", "score_hist_bins"):
            v = getattr(self, f)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f, f"must be an integer >= 1, got {v!r}")
        if isinstance(self.dedup, dict):
            object.__setattr__(self, "dedup", DedupConfig(**self.dedup))

    @property
    def max_doc_bytes(self) -> int:
        return int(self.max_doc_mb * 1e6)

    def replace(self, **changes) -> "ProcessConfig":
        return dataclasses.replace(self, **changes)
