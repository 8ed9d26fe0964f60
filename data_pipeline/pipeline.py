"""The grain input pipeline: ArrayRecord / Parquet sources -> quality score -> filter -> tokenize -> pack -> batch,
per-process sharded, weighted mixtures, multiprocess workers, deterministic for a seed, checkpointable.

    it = make_train_iterator(prepared, cfg, process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)          # {"input_ids", "segment_ids", "positions", "loss_mask"}: int32 [batch_size, seq_len]
    state = it.get_state()    # or grain.checkpoint.CheckpointSave(it) inside an orbax Composite
    it.set_state(state)       # resumes at the same example

Each mixture component is one grain MapDataset over its shards: sharded by process (`ds[i::n]`, disjoint and
covering), shuffled globally (reshuffled every epoch), repeated, parsed, scored (only records that carry no
score, e.g. raw text shards), filtered by `min_score`, tokenized (only records without tokens), then chunked and
packed into rows on its own. Components are mixed row by row (`IterDataset.mix`), so weights are shares of
tokens. Batches are built after mixing; `num_workers > 0` runs all of it in grain worker processes
(`mp_prefetch`), each on a slice of every component.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import logging
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import grain
import numpy as np
from absl import flags

from data_pipeline import records
from data_pipeline.classifier import QualityClassifier
from data_pipeline.config import DataConfig, MixtureComponent
from data_pipeline.packing import ToBatch, pack
from data_pipeline.prepare import PreparedData, load_prepared
from data_pipeline.tokenizer import Tokenizer

log = logging.getLogger("data_pipeline")

Paths = Union[str, Path, Sequence[Union[str, Path]], Mapping[str, Sequence[Union[str, Path]]], Any]


# ---------------------------------------------------------------- transforms (module level: picklable for workers)
class ParseRecord(grain.transforms.Map):
    """bytes (ArrayRecord) or dict (Parquet row) -> document dict; undecodable records become {"_bad": reason}."""

    def map(self, element):
        if isinstance(element, dict):
            return element
        try:
            return records.decode_record(element)
        except Exception as e:  # a corrupt record must not stop a long run: it is logged and filtered out
            log.warning("skipping an undecodable record: %s", e)
            return {"_bad": str(e)}


class ScoreQuality(grain.transforms.Map):
    """Adds "score" = P(high quality) to text records that have none (the classifier loads lazily per worker)."""

    def __init__(self, classifier):
        self.classifier = classifier

    def map(self, doc):
        if "score" not in doc and "text" in doc and "_bad" not in doc:
            if self.classifier is None:
                raise ValueError("records carry no quality score and no classifier was given to compute one")
            doc["score"] = float(self.classifier.score([doc["text"]])[0])
        return doc


class KeepDocument(grain.transforms.Filter):
    """Keeps parsed documents scoring at least min_score (min_score <= 0 keeps every parsed document)."""

    def __init__(self, min_score: float):
        self.min_score = min_score

    def filter(self, doc) -> bool:
        if "_bad" in doc:
            return False
        if self.min_score <= 0:
            return True
        if "score" not in doc:
            raise ValueError(f"a record from {doc.get('source', '?')} has no quality score to compare with "
                             f"min_score {self.min_score}; give a classifier or set the component's min_score: 0.0")
        return float(doc["score"]) >= self.min_score


class TokenizeDocument(grain.transforms.Map):
    """Document -> {"tokens", "loss_mask"}: token records pass through (their SFT mask becomes the loss mask),
    text records are encoded as BOS + text + EOS with every token a target."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def map(self, doc):
        if "tokens" in doc:
            t = np.asarray(doc["tokens"], np.int32)
            m = np.asarray(doc["mask"], np.int32) if "mask" in doc else np.ones_like(t)
            return {"tokens": t, "loss_mask": m}
        if self.tokenizer is None:
            raise ValueError("text records need a tokenizer (prepared data or data.tokenizer.path)")
        t = np.asarray(self.tokenizer.encode(doc["text"], add_bos=True, add_eos=True), np.int32)
        return {"tokens": t, "loss_mask": np.ones_like(t)}


# ---------------------------------------------------------------- sources
class ParquetSource(grain.sources.RandomAccessDataSource):
    """Random access to the rows of Parquet files (grain's ParquetIterDataset is sequential only).

    Rows are read a row group at a time (a small LRU of groups), so a global shuffle costs one row-group read per
    row; for large corpora convert to ArrayRecord (`minicpm data build --inputs`) first. grain's prefetch calls
    `__getitem__` from several threads: the open files and the group cache are shared, so one lock guards them (two
    threads reading one `ParquetFile` at once crashed pyarrow with a segfault).
    """

    def __init__(self, paths: Sequence[str], columns: Optional[Sequence[str]] = None, cache_groups: int = 4):
        import pyarrow.parquet as pq   # heavy (pyarrow): Parquet inputs only

        self.paths = [str(p) for p in paths]
        self.columns = list(columns) if columns else None
        self.cache_groups = cache_groups
        self._index = []  # (file, group, first row, rows)
        total = 0
        for fi, p in enumerate(self.paths):
            md = pq.ParquetFile(p).metadata
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                self._index.append((fi, g, total, n))
                total += n
        self._len = total
        self._starts = np.array([e[2] for e in self._index], np.int64)
        self._cache: dict = {}
        self._files: dict = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict:
        import pyarrow.parquet as pq   # heavy (pyarrow): Parquet inputs only

        i = int(i)
        if not 0 <= i < self._len:
            raise IndexError(i)
        k = int(np.searchsorted(self._starts, i, side="right") - 1)
        fi, g, start, _ = self._index[k]
        with self._lock:
            rows = self._cache.get(k)
            if rows is None:
                if fi not in self._files:
                    self._files[fi] = pq.ParquetFile(self.paths[fi])
                rows = self._files[fi].read_row_group(g, columns=self.columns).to_pylist()
                if len(self._cache) >= self.cache_groups:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[k] = rows
        return rows[i - start]

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_lock"} | {"_cache": {}, "_files": {}}

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def __repr__(self) -> str:
        return f"ParquetSource({len(self.paths)} files, {self._len} rows)"


def _data_source(paths: Sequence[str]):
    pq = [p for p in paths if str(p).endswith(".parquet")]
    ar = [p for p in paths if not str(p).endswith(".parquet")]
    if pq and ar:
        raise ValueError(f"a mixture component mixes Parquet and ArrayRecord files: {paths[:4]}...; split them")
    if pq:
        return ParquetSource(pq)
    return grain.sources.ArrayRecordDataSource([str(p) for p in ar])


# ---------------------------------------------------------------- inputs
@dataclasses.dataclass
class Inputs:
    """What the pipeline reads: shards per source name, and the tokenizer / classifier for raw text records."""

    train: dict[str, list[str]]
    eval: dict[str, list[str]]
    tokenizer: Any = None
    classifier: Any = None


def _expand(p: Union[str, Path]) -> list[str]:
    p = str(p)
    if any(c in p for c in "*?["):
        return sorted(globlib.glob(p))
    path = Path(p)
    if path.is_dir():
        return [str(x) for x in records.list_shards(path)] + sorted(str(x) for x in path.glob("*.parquet"))
    return [p]


def resolve_inputs(prepared_or_paths: Paths, cfg: DataConfig, classifier: Any = None) -> Inputs:
    """PreparedData | a prepared workdir | a directory or glob of shards | a list of paths | {source: [paths]}.
    `classifier` (a QualityClassifier or its directory) scores text records that carry no score."""
    x = prepared_or_paths
    if isinstance(x, (str, Path)) and (Path(x) / "prepared.json").exists():
        x = load_prepared(x)
    if isinstance(x, PreparedData):
        return Inputs(train=x.shards("train"), eval=x.shards("eval"), tokenizer=x.tokenizer,
                      classifier=x.classifier())
    if isinstance(x, Mapping):
        train = {k: [q for p in v for q in _expand(p)] for k, v in x.items()}
    else:
        paths = [q for p in ([x] if isinstance(x, (str, Path)) else x) for q in _expand(p)]
        train = {}
        for p in paths:
            train.setdefault(records.shard_prefix(p), []).append(p)
    tok = None
    if cfg.tokenizer.path:
        tok = Tokenizer.load(cfg.tokenizer.path)
    if isinstance(classifier, (str, Path)):
        classifier = QualityClassifier.load(classifier)
    return Inputs(train=train, eval=dict(train), tokenizer=tok, classifier=classifier)


def _component_paths(comp: MixtureComponent, available: Mapping[str, list[str]]) -> list[str]:
    paths: list[str] = []
    for sel in comp.sources:
        if sel == "*":
            paths.extend(p for v in available.values() for p in v)
        elif sel in available:
            paths.extend(available[sel])
        elif "/" in sel or any(c in sel for c in "*?[") or sel.endswith((records.SHARD_SUFFIX, ".parquet")):
            found = _expand(sel)
            if not found:
                raise ValueError(f"data.mixture[{comp.name}]: no files match {sel!r}")
            paths.extend(found)
        else:
            raise ValueError(f"data.mixture[{comp.name}].sources: unknown source {sel!r}; prepared sources: "
                             f"{', '.join(sorted(available))}")
    if not paths:
        raise ValueError(f"data.mixture[{comp.name}]: selects no shards")
    return sorted(dict.fromkeys(paths))


def mixture(cfg: DataConfig) -> tuple[MixtureComponent, ...]:
    """The configured components, or the default single component (every training source, natural mix)."""
    if cfg.mixture:
        return cfg.mixture
    return (MixtureComponent(name="all", weight=1.0, sources=("*",)),)


def _min_score(comp: MixtureComponent, cfg: DataConfig) -> float:
    if comp.min_score is not None:
        return comp.min_score
    # SFT conversations are not quality-scored: the classifier judges pretraining documents
    return cfg.classifier.threshold if cfg.filter_quality and cfg.task == "pretrain" else 0.0


# ---------------------------------------------------------------- datasets
def _options() -> grain.experimental.DatasetOptions:
    # Quality filtering drops most of a raw pool by design: grain's "filtered too much" warning is noise here, but
    # a window of 1000 documents with none kept means a filter that keeps nothing: raise instead of spinning
    # forever on an infinite dataset. Batches are a few hundred kB: pickling them from workers beats shared
    # memory (and its noisy cleanup).
    return grain.experimental.DatasetOptions(filter_warn_threshold_ratio=None, filter_raise_threshold_ratio=1.0,
                                             min_shm_size=1 << 30)


def _rows(paths: Sequence[str], *, min_score: float, cfg: DataConfig, inputs: Inputs, process_index: int,
          process_count: int, seed: int, num_epochs: Optional[int], shuffle: bool) -> grain.IterDataset:
    ds = grain.MapDataset.source(_data_source(paths))
    if len(ds) < process_count:
        raise ValueError(f"{len(ds)} records in {paths[:3]} cannot be sharded over {process_count} processes")
    ds = ds[process_index::process_count]  # disjoint, covering: record i goes to process i % n
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)  # None = forever; each epoch is reshuffled (seed + epoch)
    ds = ds.map(ParseRecord())
    if min_score > 0:
        ds = ds.map(ScoreQuality(inputs.classifier))
    ds = ds.filter(KeepDocument(min_score))
    ds = ds.map(TokenizeDocument(inputs.tokenizer))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=128))
    return pack(it, cfg.seq_len, num_bins=cfg.num_packing_bins, seed=seed, shuffle_bins=shuffle,
                one_per_row=not cfg.pack)


def _finish(rows: grain.IterDataset, cfg: DataConfig, inputs: Inputs, *, drop_remainder: bool,
            num_workers: int) -> grain.IterDataset:
    pad_id = inputs.tokenizer.pad_id if inputs.tokenizer is not None else 0
    ds = rows.batch(cfg.batch_size, drop_remainder=drop_remainder).map(ToBatch(cfg.batch_size, pad_id))
    ds = grain.experimental.WithOptionsIterDataset(ds, _options())
    if num_workers > 0:
        _ensure_absl_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    return ds


def _ensure_absl_flags() -> None:
    # grain's worker processes read absl flags; outside absl.app.run they are unparsed and grain raises
    # UnparsedFlagAccessError. Marking them parsed keeps every flag at its default.

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax   # the data side needs JAX only for the process index default

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def make_train_dataset(prepared_or_paths: Paths, cfg: DataConfig, *, process_index: Optional[int] = None,
                       process_count: Optional[int] = None, num_epochs: Optional[int] = None,
                       num_workers: Optional[int] = None, classifier: Any = None) -> grain.IterDataset:
    """The training IterDataset (see module doc). num_epochs None = infinite; a finite run ends with a padded
    partial batch. num_workers overrides cfg.num_workers. `classifier` (QualityClassifier or directory) scores raw
    text records in the pipeline; prepared data brings its own."""
    pi, pc = _process(process_index, process_count)
    inputs = resolve_inputs(prepared_or_paths, cfg, classifier)
    comps = mixture(cfg)
    parts = []
    for k, comp in enumerate(comps):
        paths = _component_paths(comp, inputs.train)
        parts.append(_rows(paths, min_score=_min_score(comp, cfg), cfg=cfg, inputs=inputs, process_index=pi,
                           process_count=pc, seed=(cfg.seed + 7919 * k) % 2**32, num_epochs=num_epochs,
                           shuffle=cfg.shuffle))
    rows = parts[0] if len(parts) == 1 else grain.IterDataset.mix(
        {c.name: p for c, p in zip(comps, parts)}, {c.name: c.weight for c in comps})
    workers = cfg.num_workers if num_workers is None else num_workers
    return _finish(rows, cfg, inputs, drop_remainder=num_epochs is None, num_workers=workers)


def make_train_iterator(prepared_or_paths: Paths, cfg: DataConfig, *, process_index: Optional[int] = None,
                        process_count: Optional[int] = None, num_epochs: Optional[int] = None,
                        num_workers: Optional[int] = None, classifier: Any = None) -> grain.DatasetIterator:
    """Iterator of training batches; supports get_state()/set_state() and grain.checkpoint.CheckpointSave/Restore.

    process_index / process_count default to jax.process_index() / jax.process_count().
    """
    return iter(make_train_dataset(prepared_or_paths, cfg, process_index=process_index,
                                   process_count=process_count, num_epochs=num_epochs, num_workers=num_workers,
                                   classifier=classifier))


def make_eval_dataset(prepared_or_paths: Paths, cfg: DataConfig, *, process_index: Optional[int] = None,
                      process_count: Optional[int] = None, sources: Optional[Sequence[str]] = None
                      ) -> grain.IterDataset:
    """One ordered pass over the eval shards (held-out sources and eval splits), unfiltered, unshuffled;
    the last batch is padded with empty rows (loss_mask 0)."""
    pi, pc = _process(process_index, process_count)
    inputs = resolve_inputs(prepared_or_paths, cfg)
    names = list(sources) if sources else list(inputs.eval)
    unknown = [s for s in names if s not in inputs.eval]
    if unknown:
        raise ValueError(f"eval sources {unknown} are not prepared; available: {', '.join(sorted(inputs.eval))}")
    paths = sorted(p for s in names for p in inputs.eval[s])
    if not paths:
        raise ValueError("no eval shards to read")
    rows = _rows(paths, min_score=0.0, cfg=cfg, inputs=inputs, process_index=pi, process_count=pc,
                 seed=cfg.seed, num_epochs=1, shuffle=False)
    return _finish(rows, cfg, inputs, drop_remainder=False, num_workers=0)


def make_eval_iterator(prepared_or_paths: Paths, cfg: DataConfig, *, process_index: Optional[int] = None,
                       process_count: Optional[int] = None, sources: Optional[Sequence[str]] = None
                       ) -> grain.DatasetIterator:
    """Iterator over eval batches (same format as training); `sources` picks some eval sets (default: all)."""
    return iter(make_eval_dataset(prepared_or_paths, cfg, process_index=process_index, process_count=process_count,
                                  sources=sources))
