"""DataConfig: the `data:` section of an experiment YAML, as frozen dataclasses with defaults for the tiny CPU run.

An experiment file states only what differs, e.g.

    data:
      seq_len: 1024
      classifier: {dim: 256, lr: 0.1, word_ngrams: 3, min_count: 5, epochs: 3}
      mixture:
        - {name: candidate, weight: 0.3, min_score: 0.5}
        - {name: default, weight: 0.7, min_score: 0.0}

`DataConfig.from_dict(d)` merges `d` onto the defaults with OmegaConf (unknown keys and wrong types fail with the
field's full name); `__post_init__` checks values and names the field in its message.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple

import yaml
from omegaconf import OmegaConf

TASKS = ("pretrain", "sft")
CLASSIFIER_TOKENIZATIONS = ("spm", "simple")


def _check(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"data.{field}: {msg}")


def _tuple(x: Any) -> tuple:
    if x is None:
        return ()
    if isinstance(x, str):
        return (x,)
    return tuple(x)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """UltraClean fastText quality classifier (spec §4.1).

    The paper uses dim 256, lr 0.1, word n-grams 3, min count 5, 3 epochs and threshold 0.5 on billions of tokens;
    the defaults here are sized for a corpus of ~10k documents (see experiments/configs/data/ultraclean_paper.yaml for
    the paper's values; a sweep on the source-held-out split picked these). `bucket` x `dim` sets the model size
    (fastText's hashed n-gram table: 17 MB here), `quantize` writes a product-quantized `.ftz` of ~2 MB.
    """

    dim: int = 16
    lr: float = 0.5
    word_ngrams: int = 2
    min_count: int = 1
    epochs: int = 6
    min_updates: int = 4_000_000  # at least this many SGD token updates (epochs x training tokens): a small
    # training set gets more epochs (up to 100) instead of an underfit model whose scores all sit near 0.5
    bucket: int = 262_144
    threshold: float = 0.5  # keep a document when P(pos) >= threshold
    rounds: int = 2  # 1 = train on the seeds only; each further round adds confident predictions from the pool
    seed_fraction: float = 0.7  # share of labelled training documents used as the initial verified seeds; the
    # rest joins the pool that later rounds label by confident prediction
    confident_pos: float = 0.9  # pool documents at or above this become positives in the next round
    confident_neg: float = 0.1  # pool documents at or below this become negatives in the next round
    neg_ratio: float = 1.0  # negatives per positive in each round's training set
    max_train_docs: int = 40_000  # cap on one round's training set (pos + neg)
    quantize: bool = False  # product-quantize to .ftz (~2 MB instead of ~17 MB; costs 15-60 s on 2 cores)
    tokenization: str = "spm"  # "spm": our SentencePiece pieces (paper: the LM tokenizer); "simple": regex words + CJK chars
    threads: int = 1  # fastText threads; 1 = deterministic model for a seed (training takes a few seconds)
    heldout_sources: Tuple[str, ...] = ()  # evaluated by source, never trained on; empty = the registry's defaults

    def __post_init__(self):
        object.__setattr__(self, "heldout_sources", _tuple(self.heldout_sources))
        for f in ("dim", "word_ngrams", "min_count", "epochs", "min_updates", "bucket", "rounds", "max_train_docs",
                  "threads"):
            v = getattr(self, f)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"classifier.{f}",
                   f"must be an integer >= 1, got {v!r}")
        _check(0 < self.lr <= 10, "classifier.lr", f"must be in (0, 10], got {self.lr!r}")
        for f in ("threshold", "confident_pos", "confident_neg"):
            v = getattr(self, f)
            _check(0.0 <= v <= 1.0, f"classifier.{f}", f"must be a probability in [0, 1], got {v!r}")
        _check(self.confident_neg < self.threshold < self.confident_pos, "classifier.confident_pos",
               f"need confident_neg ({self.confident_neg}) < threshold ({self.threshold}) < confident_pos "
               f"({self.confident_pos})")
        _check(0.0 < self.seed_fraction <= 1.0, "classifier.seed_fraction",
               f"must be in (0, 1], got {self.seed_fraction!r}")
        _check(self.neg_ratio > 0, "classifier.neg_ratio", f"must be > 0, got {self.neg_ratio!r}")
        _check(self.tokenization in CLASSIFIER_TOKENIZATIONS, "classifier.tokenization",
               f"must be one of {CLASSIFIER_TOKENIZATIONS}, got {self.tokenization!r}")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Where the tokenizer comes from: an existing one (`path`) or trained on the corpus (SentencePiece BPE)."""

    path: Optional[str] = None  # a dir or file holding tokenizer.model / tokenizer.json; None = train one
    character_coverage: float = 0.9995
    max_train_mb: float = 16.0  # text sampled from the training split to train on
    # Llama adds a dummy "▁" before every text fragment; with ChatML that puts a stray "▁" after each special
    # token, so ours is trained without it. The exporter reads the flag from the model (Tokenizer.add_dummy_prefix).
    add_dummy_prefix: bool = False

    def __post_init__(self):
        _check(0.9 <= self.character_coverage <= 1.0, "tokenizer.character_coverage",
               f"must be in [0.9, 1], got {self.character_coverage!r}")
        _check(self.max_train_mb > 0, "tokenizer.max_train_mb", f"must be > 0, got {self.max_train_mb!r}")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Chat (SFT) data from real question/answer pairs (FAQ sources), ChatML, assistant-only loss."""

    sources: Tuple[str, ...] = ("auto",)  # "auto" = every available QA source; or names from data_pipeline.sft
    system_prompt: str = "You are a helpful assistant."
    max_turns: int = 3  # consecutive QA pairs of one section joined into one multi-turn conversation
    eval_fraction: float = 0.1
    max_per_source: int = 1000  # the templated wiki QA would otherwise outnumber the real FAQs 50 to 1
    max_conversations: int = 20_000

    def __post_init__(self):
        object.__setattr__(self, "sources", _tuple(self.sources))
        _check(self.max_turns >= 1, "sft.max_turns", f"must be >= 1, got {self.max_turns!r}")
        _check(0.0 <= self.eval_fraction < 1.0, "sft.eval_fraction", f"must be in [0, 1), got {self.eval_fraction!r}")
        _check(self.max_conversations >= 1, "sft.max_conversations", f"must be >= 1, got {self.max_conversations!r}")
        _check(self.max_per_source >= 1, "sft.max_per_source", f"must be >= 1, got {self.max_per_source!r}")


@dataclasses.dataclass(frozen=True)
class MixtureComponent:
    """One component of the training mixture: the documents of `sources`, filtered by `min_score`, drawn with
    `weight`. Components are packed separately and mixed row by row, so weights are shares of tokens.

    sources: prepared source names, "*" for every prepared training source (at their natural proportions), or
        paths / globs of ArrayRecord or Parquet files.
    min_score: keep documents with quality score >= min_score; None = the data-level default (classifier.threshold
        when filter_quality, else no filter); 0.0 = no filter.
    """

    name: str
    weight: float
    sources: Tuple[str, ...] = ("*",)
    min_score: Optional[float] = None

    def __post_init__(self):
        object.__setattr__(self, "sources", _tuple(self.sources))
        _check(bool(self.name), "mixture.name", "must be a non-empty string")
        _check(self.weight > 0, f"mixture[{self.name}].weight", f"must be > 0, got {self.weight!r}")
        _check(len(self.sources) > 0, f"mixture[{self.name}].sources", "must name at least one source")
        if self.min_score is not None:
            _check(0.0 <= self.min_score <= 1.0, f"mixture[{self.name}].min_score",
                   f"must be in [0, 1] or null, got {self.min_score!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Everything the data side needs; defaults are the tiny CPU run (pip-only sources, ~1 minute to prepare)."""

    task: str = "pretrain"  # "pretrain" (documents) or "sft" (ChatML conversations, assistant-only loss)
    seq_len: int = 512
    batch_size: int = 8  # per process
    vocab_size: int = 8192
    seed: int = 0
    num_workers: int = 0  # grain mp_prefetch worker processes (0 = in the training process)
    # corpus
    sources: Tuple[str, ...] = ("auto",)  # tiers (auto, pip, system, debian) and/or source names
    download: bool = True  # fetch Debian packages (apt-get download into cache_dir) for sources that need them
    cache_dir: Optional[str] = None  # Debian package cache; None = $MINICPM_CACHE or ~/.cache/minicpm-jax
    inputs: Tuple[str, ...] = ()  # extra JSONL files of {"text", ...} documents, added as source "user"
    max_docs_per_source: int = 3000
    max_mb_per_source: float = 3.0
    min_doc_chars: int = 300  # consecutive short units (paragraphs, reviews) are joined up to this size
    max_doc_chars: int = 4000  # longer units are split at paragraph boundaries
    max_input_doc_mb: float = 8.0  # an input document above this is reported and skipped ("huge")
    eval_sources: Tuple[str, ...] = ()  # LM eval sets; empty = held-out high-quality sources and eval splits
    # pipeline
    filter_quality: bool = True  # drop documents scoring below classifier.threshold
    mixture: Tuple[MixtureComponent, ...] = ()  # empty = one component: every training source, natural mix
    num_packing_bins: int = 16
    pack: bool = True  # False: one document piece per row (InfLLM v2 sparse attention needs unpacked rows)
    shuffle: bool = True
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)

    def __post_init__(self):
        for f in ("sources", "inputs", "eval_sources"):
            object.__setattr__(self, f, _tuple(getattr(self, f)))
        comps = tuple(c if isinstance(c, MixtureComponent) else MixtureComponent(**dict(c)) for c in self.mixture)
        object.__setattr__(self, "mixture", comps)
        for f, sub in (("classifier", ClassifierConfig), ("tokenizer", TokenizerConfig), ("sft", SFTConfig)):
            v = getattr(self, f)
            if isinstance(v, Mapping):
                object.__setattr__(self, f, sub(**dict(v)))
        _check(self.task in TASKS, "task", f"must be one of {TASKS}, got {self.task!r}")
        for f in ("seq_len", "batch_size", "vocab_size", "max_docs_per_source", "min_doc_chars", "max_doc_chars",
                  "num_packing_bins"):
            v = getattr(self, f)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f, f"must be an integer >= 1, got {v!r}")
        _check(self.seq_len >= 8, "seq_len", f"must be >= 8, got {self.seq_len}")
        _check(self.vocab_size >= 300, "vocab_size",
               f"must be >= 300 (256 byte-fallback pieces + specials), got {self.vocab_size}")
        _check(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed!r}")
        _check(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers",
               f"must be an integer >= 0, got {self.num_workers!r}")
        _check(self.max_mb_per_source > 0, "max_mb_per_source", f"must be > 0, got {self.max_mb_per_source!r}")
        _check(self.max_input_doc_mb > 0, "max_input_doc_mb", f"must be > 0, got {self.max_input_doc_mb!r}")
        _check(self.min_doc_chars < self.max_doc_chars, "min_doc_chars",
               f"must be < max_doc_chars ({self.max_doc_chars}), got {self.min_doc_chars}")
        _check(len(self.sources) > 0, "sources", "must name at least one tier or source")
        names = [c.name for c in self.mixture]
        _check(len(names) == len(set(names)), "mixture", f"component names must be unique, got {names}")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]] = None, overrides: Sequence[str] = ()) -> "DataConfig":
        """Defaults <- `d` (the `data:` mapping of an experiment) <- `overrides` ("key=value" dotlist strings)."""
        base = OmegaConf.structured(cls)
        merged = OmegaConf.merge(base, OmegaConf.create(dict(d or {})), OmegaConf.from_dotlist(list(overrides)))
        kwargs = OmegaConf.to_container(merged, resolve=True)
        for i, comp in enumerate(kwargs.get("mixture") or ()):
            if not isinstance(comp, Mapping):
                raise ValueError(f"data.mixture[{i}]: expected a mapping {{name, weight, sources, min_score}}, "
                                 f"got {comp!r}")
            unknown = set(comp) - {f.name for f in dataclasses.fields(MixtureComponent)}
            if unknown:
                raise ValueError(f"data.mixture[{i}]: unknown key(s) {sorted(unknown)}; expected name, weight, "
                                 "sources, min_score")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> "DataConfig":
        """Read the `data:` section of an experiment YAML (or a file that is only a data section)."""
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        section = doc.get("data", doc) if isinstance(doc, Mapping) else None
        if not isinstance(section, Mapping):
            raise ValueError(f"{path}: expected a mapping under 'data:', got {type(section).__name__}")
        return cls.from_dict(section, overrides)

    def to_dict(self) -> dict:
        """Plain-Python dict (JSON/YAML-able) that `from_dict` maps back to an equal config."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "DataConfig":
        return dataclasses.replace(self, **changes)
