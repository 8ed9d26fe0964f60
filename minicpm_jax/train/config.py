"""Experiment configuration: one YAML per experiment, stating only what differs from these defaults.

    minicpm train --config experiments/configs/tiny.yaml optim.peak_lr=5e-3 model.num_hidden_layers=2

OmegaConf merges the defaults, the YAML and the `key=value` overrides and type-checks them (an unknown key or a value
of the wrong type fails with its full dotted name); each section's dataclass then checks its values. The `model`
section is `minicpm_jax.model_spec.ModelSection` (a preset or checkpoint config, HF-named overrides, the attention
mode), the `data` section is `data_pipeline.config.DataConfig`. Shipped configs (`minicpm_jax/configs/*.yaml`) can be
named without a path: `--config minicpm4_8b`.
"""

from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data_pipeline.config import DataConfig
from minicpm_jax.config import ModelConfig
from minicpm_jax.model_spec import ModelSection

DECAY_SHAPES = ("linear", "cosine", "exponential")
MUP_RULES = ("hidden", "every_2d")   # see minicpm_jax/train/mup.py

# What a new phase (`train.init_from`) checks against its source's model config (`minicpm_jax.train.phase`).
# The weights' shapes depend on these: they must agree, and cannot be overridden.
INIT_FROM_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "tie_word_embeddings")
# These change the forward pass of the same weights (RoPE, norms, μP scalars; max_position_embeddings only through
# LongRoPE's scaling and factor choice): they must agree unless listed in train.init_from_override.
INIT_FROM_MATH_FIELDS = ("rope_theta", "rope_scaling", "max_position_embeddings", "rms_norm_eps", "scale_emb",
                         "dim_model_base", "scale_depth")


def _need(cond: bool, field: str, msg: str):
    if not cond:
        raise ValueError(f"{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with a WSD schedule and μP per-tensor learning rates.

    peak_lr is the learning rate of the base-width model (hidden = dim_model_base). With `mup`, `mup_rule` says which
    tensors train at peak_lr / (hidden_size / dim_model_base) and start from a 1/sqrt of that narrower init:
    "hidden" = attention and MLP kernels (embeddings, head and norms keep peak_lr; μP for Adam, the head's 1/width
    factor being in the forward pass); "every_2d" = every 2-D tensor, embeddings and head too (minicpm_jax/train/
    mup.py). `mup: false` gives every tensor peak_lr; with model.dim_model_base = hidden_size that is standard
    parametrisation.
    """

    peak_lr: float = 1e-2
    warmup_steps: int = 20
    decay_steps: int = 40                # the last decay_steps of the run anneal the learning rate
    decay_shape: str = "exponential"     # linear | cosine | exponential
    final_lr_ratio: float = 0.1          # lr at the end of the decay, as a fraction of peak_lr
    init_lr_ratio: float = 0.0           # lr at step 0, as a fraction of peak_lr (warmup starts here)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False       # apply weight decay to embeddings / head (norms are never decayed)
    clip_grad_norm: float = 1.0          # <= 0 disables clipping
    mup: bool = True
    mup_rule: str = "hidden"             # hidden | every_2d (which tensors scale with width; used when mup is true)

    def __post_init__(self):
        _need(self.mup_rule in MUP_RULES, "optim.mup_rule", f"must be one of {MUP_RULES}, got {self.mup_rule!r}")
        _need(self.peak_lr > 0, "optim.peak_lr", f"must be > 0, got {self.peak_lr}")
        _need(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _need(self.decay_steps >= 0, "optim.decay_steps", f"must be >= 0, got {self.decay_steps}")
        _need(self.decay_shape in DECAY_SHAPES, "optim.decay_shape",
              f"must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        _need(0 < self.final_lr_ratio <= 1, "optim.final_lr_ratio", f"must be in (0, 1], got {self.final_lr_ratio}")
        _need(0 <= self.init_lr_ratio <= 1, "optim.init_lr_ratio", f"must be in [0, 1], got {self.init_lr_ratio}")
        _need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1/b2", f"must be in [0, 1), got {self.b1}, {self.b2}")
        _need(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")


# Memory per chip in bytes (vendor figures, decimal GB) for the dry run's fit check.
ACCELERATORS = {"h100": 80e9, "h200": 141e9, "a100-80gb": 80e9, "a100-40gb": 40e9, "tpu-v4": 32e9, "tpu-v5e": 16e9,
                "tpu-v5p": 95e9, "tpu-v6e": 32e9}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; one may be -1 ("the rest of the devices"). `accelerator`: the chip a pod config is sized
    for (a key of ACCELERATORS); the dry run holds the step to 90 % of its memory."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    accelerator: Optional[str] = None

    def __post_init__(self):
        _need(self.accelerator is None or self.accelerator in ACCELERATORS, "mesh.accelerator",
              f"must be one of {sorted(ACCELERATORS)} or null, got {self.accelerator!r}")

    def as_dict(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host setup. `auto` calls jax.distributed.initialize() when a cluster is detected (TPU pods, SLURM, ...)."""

    mode: str = "auto"                     # auto | off | explicit
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    initialization_timeout: int = 300

    def __post_init__(self):
        _need(self.mode in ("auto", "off", "explicit"), "distributed.mode",
              f"must be auto, off or explicit, got {self.mode!r}")
        if self.mode == "explicit":
            _need(bool(self.coordinator_address) and self.num_processes and self.process_id is not None,
                  "distributed", "explicit mode needs coordinator_address, num_processes and process_id")


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    steps: int = 200
    micro_batches: int = 1            # gradient accumulation: the per-step batch is split into this many parts
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    async_checkpoint: bool = True
    log_every: int = 1                # metrics every N steps (and a plain progress line when not on a terminal)
    loss_chunk_size: int = 2048       # tokens per chunk of the cross-entropy (bounds the [tokens, vocab] logits)
    resume: bool = True               # continue from the latest checkpoint in output_dir if there is one
    overwrite: bool = False           # with resume=false over an existing run: move its files to <run>/previous-<n>/
    # A new phase from a checkpoint (see minicpm_jax/train/phase.py): its model fields that the model section does
    # not set come from the source's config; the ones it sets must agree with the source where they change the math
    # (INIT_FROM_SHAPE_FIELDS, INIT_FROM_MATH_FIELDS) unless named in init_from_override.
    init_from: Optional[str] = None   # start from these weights (HF dir or a run dir) with a new schedule
    init_from_step: Optional[int] = None  # which checkpoint of a run dir (default: latest)
    init_from_override: tuple[str, ...] = ()  # INIT_FROM_MATH_FIELDS whose value in this config wins over the source's
    init_from_optimizer: bool = False  # also continue the source run's Adam moments (run dir only); step and lr
    #                                    schedule still start at 0 (WSD decay, context extension of a stable run)
    profile_steps: tuple[int, ...] = ()  # jax.profiler trace around these steps (written under output_dir/profile)
    sample_prompts: tuple[str, ...] = ("The history of", "中国的")
    sample_tokens: int = 48
    sample_chat: bool = False          # wrap sample prompts in the ChatML template (SFT runs)
    sample_temperature: float = 0.8    # end-of-run samples; 0 = greedy (greedy text of a small model repeats itself)
    sample_top_p: float = 0.9

    def __post_init__(self):
        for f in ("steps", "micro_batches", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                  "log_every", "loss_chunk_size"):
            _need(getattr(self, f) >= 1, f"train.{f}", f"must be >= 1, got {getattr(self, f)}")
        _need(self.sample_temperature >= 0, "train.sample_temperature", f"must be >= 0, got {self.sample_temperature}")
        _need(0 < self.sample_top_p <= 1, "train.sample_top_p", f"must be in (0, 1], got {self.sample_top_p}")
        for f in self.init_from_override:
            _need(f not in INIT_FROM_SHAPE_FIELDS, "train.init_from_override",
                  f"{f!r} cannot be overridden: the weights' shapes depend on it")
            known = f in {x.name for x in dataclasses.fields(ModelConfig)}
            _need(f in INIT_FROM_MATH_FIELDS, "train.init_from_override",
                  (f"{f!r} is not checked against the source (a value this config sets is used as is)" if known else
                   f"unknown field {f!r}") + f"; the fields it may name are {list(INIT_FROM_MATH_FIELDS)}")
        for f in ("init_from_override", "init_from_optimizer"):
            _need(not getattr(self, f) or self.init_from is not None, f"train.{f}",
                  "only means something with train.init_from (the checkpoint a new phase starts from)")


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """Train an EAGLE draft head for speculative decoding (spec §5.2) instead of the model: with `target` set, the
    run loads that model frozen (a training run or HF directory; the model section is completed from its config, as
    for train.init_from) and trains a one-layer draft head on its features over this run's data
    (`minicpm_jax/train/draft_step.py`). Checkpoints, metrics, eval and resume are the usual ones; the run ends by
    exporting the head as an HF directory (`export/draft`) and checking speculative decoding against plain decoding.

    The FR-Spec vocabulary (the ids the head scores) is the `fr_size` most frequent ids (0: `fr_fraction` of the
    vocabulary) of the first `fr_count_batches` training batches, plus the tokenizer's BOS/EOS/chat ids, the
    model's EOS ids and `always_ids`."""

    target: Optional[str] = None
    target_step: Optional[int] = None    # a run's checkpoint step (default: its latest)
    fr_size: int = 0
    fr_fraction: float = 0.25
    fr_count_batches: int = 64
    always_ids: tuple[int, ...] = ()
    feature_weight: float = 1.0          # smooth-L1 feature regression (EAGLE: 1.0)
    token_weight: float = 0.1            # soft cross-entropy over the FR ids (EAGLE: 0.1)
    head_from_target: bool = True        # the FR head starts as the target's head at the FR ids
    check_tokens: int = 32               # end of run: tokens per sample prompt decoded with and without the draft
    check_draft_tokens: int = 4          # ... drafting this many per target pass

    def __post_init__(self):
        _need(self.fr_size >= 0, "draft.fr_size", f"must be >= 0 (0: use draft.fr_fraction), got {self.fr_size}")
        _need(0 < self.fr_fraction <= 1, "draft.fr_fraction", f"must be in (0, 1], got {self.fr_fraction}")
        for f in ("fr_count_batches", "check_tokens", "check_draft_tokens"):
            _need(getattr(self, f) >= 1, f"draft.{f}", f"must be >= 1, got {getattr(self, f)}")
        _need(self.feature_weight >= 0 and self.token_weight >= 0 and self.feature_weight + self.token_weight > 0,
              "draft.feature_weight/token_weight", f"must be >= 0 and not both 0, got {self.feature_weight}, "
              f"{self.token_weight}")
        _need(self.target_step is None or self.target is not None, "draft.target_step",
              "only means something with draft.target")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    hf: bool = True                    # write <output_dir>/export/hf at the end
    gguf_qtypes: tuple[str, ...] = ("f32",)  # GGUF files written at the end (empty = none)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = "tiny"
    output_dir: str = "runs/${name}"
    data_dir: str = "runs/data"          # prepared corpus, tokenizer, classifier (cached, shared between runs)
    seed: int = 0
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)
    draft: DraftConfig = dataclasses.field(default_factory=DraftConfig)

    def __post_init__(self):
        if self.draft.target is not None:
            _need(self.train.init_from is None, "draft.target",
                  "a draft run trains a new head on a frozen target; train.init_from (the weights of the model being "
                  "trained) does not apply")
            _need(not self.export.gguf_qtypes, "export.gguf_qtypes",
                  "a draft head is exported as an HF directory (export/draft); set export.gguf_qtypes=[]")
        _need(self.optim.warmup_steps + self.optim.decay_steps <= self.train.steps, "optim",
              f"warmup_steps ({self.optim.warmup_steps}) + decay_steps ({self.optim.decay_steps}) exceed "
              f"train.steps ({self.train.steps})")
        object.__setattr__(self, "_model_config", self.model.build())   # validated at load, built once

    def model_config(self) -> ModelConfig:
        """The ModelConfig the model section describes (built and validated when the config was loaded)."""
        return self._model_config

    def to_dict(self) -> dict:
        """Plain data (the model section as set, not every None field)."""
        d = json_ready(dataclasses.asdict(self))
        d["model"] = json_ready(self.model.to_dict())
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


def json_ready(x):
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


# Keys that moved: old name -> new name. A user config that uses an old key is refused with the new name; a run's own
# recorded config.yaml (written before the move) is read with the key migrated.
MOVED_KEYS = {"train.attention": "model.attention"}


def shipped_configs() -> dict[str, Path]:
    """Experiment configs that ship inside the package: {name: path} (e.g. "tiny", "minicpm4_8b", "data/sft")."""
    root = Path(str(resources.files("minicpm_jax") / "configs"))
    return {str(p.relative_to(root).with_suffix("")): p for p in sorted(root.rglob("*.yaml"))}


def default_config_path() -> Path:
    """The main job's config (the tiny CPU run), from the installed package."""
    return shipped_configs()["tiny"]


def resolve_config_path(path: str | Path) -> Path:
    """A YAML path, or the name of a shipped config (`tiny`, `minicpm4_8b`, `data/sft`)."""
    p = Path(path)
    if p.exists():
        if not p.is_file():
            raise ValueError(f"experiment config {p} is a directory, not a YAML file")
        return p
    shipped = shipped_configs()
    if str(path) in shipped:
        return shipped[str(path)]
    raise FileNotFoundError(f"experiment config {p} does not exist (shipped configs: {', '.join(shipped)})")


def _moved(tree: dict, overrides: Sequence[str], where: str, migrate: bool) -> tuple[dict, list[str]]:
    """Apply MOVED_KEYS: refuse (naming the new key) or, for a run's recorded config, migrate."""
    out = []
    for o in overrides:
        key = o.split("=", 1)[0]
        if key in MOVED_KEYS:
            if not migrate:
                raise ValueError(f"{key} has moved to {MOVED_KEYS[key]}: write {MOVED_KEYS[key]}={o.split('=', 1)[1]}")
            o = f"{MOVED_KEYS[key]}={o.split('=', 1)[1]}"
        out.append(o)
    for old, new in MOVED_KEYS.items():
        (osec, okey), (nsec, nkey) = old.split("."), new.split(".")
        sec = tree.get(osec)
        if isinstance(sec, dict) and okey in sec:
            if not migrate:
                raise ValueError(f"experiment config{where}: {old} has moved to {new} (the attention mode lives "
                                 f"with the other attention settings); write `{nsec}: {{{nkey}: {sec[okey]}}}`")
            tree.setdefault(nsec, {}).setdefault(nkey, sec.pop(okey))
    return tree, out


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (), *,
                recorded: bool = False) -> ExperimentConfig:
    """Defaults <- YAML file <- `key=value` overrides, validated into an ExperimentConfig.

    recorded: the file is a run's own config.yaml (keys that moved since it was written are migrated, not refused).
    """
    where = ""
    try:
        merged = OmegaConf.structured(ExperimentConfig)
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key=value, got {bad}")
        tree = {}
        if path is not None:
            path = resolve_config_path(path)
            where = f" ({path})"
            try:
                tree = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"experiment config{where}: not valid YAML: {' '.join(str(e).split())}") from None
            if not isinstance(tree, dict):
                raise ValueError(f"experiment config{where}: expected a mapping of sections, got "
                                 f"{type(tree).__name__}")
        tree, overrides = _moved(tree, overrides, where, recorded)
        merged = OmegaConf.merge(merged, OmegaConf.create(tree), OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ValueError(f"experiment config{where}: {str(e).splitlines()[0]} "
                         f"[key: {getattr(e, 'full_key', '?')}]") from None
