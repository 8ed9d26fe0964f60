"""Experiment configuration: one YAML per experiment, stating only what differs from these defaults.

    minicpm train --config experiments/configs/tiny.yaml optim.peak_lr=5e-3 model.num_hidden_layers=2

OmegaConf merges the defaults, the YAML and the `key=value` overrides and type-checks them (an unknown key or a value
of the wrong type fails with its full dotted name). The `model` section is a preset name plus HF-named overrides
(validated by `ModelConfig`); the `data` section is `data_pipeline.config.DataConfig` (validated there).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

DECAY_SHAPES = ("linear", "cosine", "exponential")


def _need(cond: bool, field: str, msg: str):
    if not cond:
        raise ValueError(f"{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with a WSD schedule and μP per-tensor learning rates.

    peak_lr is the learning rate of the base-width model (hidden = dim_model_base). Hidden matrices (attention and
    MLP kernels) use peak_lr / (hidden_size / dim_model_base); embeddings, the head and norms use peak_lr (μP for
    Adam, as in MiniCPM: the head's 1/width factor is already in the forward pass).
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

    def __post_init__(self):
        _need(self.peak_lr > 0, "optim.peak_lr", f"must be > 0, got {self.peak_lr}")
        _need(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _need(self.decay_steps >= 0, "optim.decay_steps", f"must be >= 0, got {self.decay_steps}")
        _need(self.decay_shape in DECAY_SHAPES, "optim.decay_shape",
              f"must be one of {DECAY_SHAPES}, got {self.decay_shape!r}")
        _need(0 < self.final_lr_ratio <= 1, "optim.final_lr_ratio", f"must be in (0, 1], got {self.final_lr_ratio}")
        _need(0 <= self.init_lr_ratio <= 1, "optim.init_lr_ratio", f"must be in [0, 1], got {self.init_lr_ratio}")
        _need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1/b2", f"must be in [0, 1), got {self.b1}, {self.b2}")
        _need(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; one may be -1 ("the rest of the devices")."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

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
    log_every: int = 1
    loss_chunk_size: int = 2048       # tokens per chunk of the cross-entropy (bounds the [tokens, vocab] logits)
    attention: str = "auto"           # auto | dense | sparse
    resume: bool = True               # continue from the latest checkpoint in output_dir if there is one
    init_from: Optional[str] = None   # start from these weights (HF dir or a run dir) with a fresh optimizer + schedule
    init_from_step: Optional[int] = None  # which checkpoint of a run dir (default: latest)
    profile_steps: tuple[int, ...] = ()  # jax.profiler trace around these steps (written under output_dir/profile)
    sample_prompts: tuple[str, ...] = ("The history of", "中国的")
    sample_tokens: int = 48
    sample_chat: bool = False          # wrap sample prompts in the ChatML template (SFT runs)

    def __post_init__(self):
        for f in ("steps", "micro_batches", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
                  "log_every", "loss_chunk_size"):
            _need(getattr(self, f) >= 1, f"train.{f}", f"must be >= 1, got {getattr(self, f)}")
        _need(self.attention in ("auto", "dense", "sparse"), "train.attention",
              f"must be auto, dense or sparse, got {self.attention!r}")


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
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"preset": "tiny"})
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    train: TrainLoopConfig = dataclasses.field(default_factory=TrainLoopConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

    def __post_init__(self):
        _need(self.optim.warmup_steps + self.optim.decay_steps <= self.train.steps, "optim",
              f"warmup_steps ({self.optim.warmup_steps}) + decay_steps ({self.optim.decay_steps}) exceed "
              f"train.steps ({self.train.steps})")

    # -------------------------------------------------------------- derived configs
    def model_config(self):
        """The ModelConfig: `model.preset` (or `model.hf_config`, a checkpoint dir) plus the remaining overrides."""
        from minicpm_jax.config import ModelConfig
        from minicpm_jax.convert.hf import read_config
        m = dict(self.model)
        preset, hf_dir = m.pop("preset", None), m.pop("hf_config", None)
        if hf_dir:
            base = read_config(hf_dir)
            return base.replace(**m) if m else base
        try:
            return ModelConfig.from_preset(preset or "tiny", **m)
        except TypeError as e:
            raise ValueError(f"model: {e}") from None

    def data_config(self):
        from data_pipeline.config import DataConfig
        try:
            return DataConfig.from_dict(dict(self.data))
        except OmegaConfBaseException as e:
            raise ValueError(f"data.{getattr(e, 'full_key', '?')}: {str(e).splitlines()[0]}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(json_ready(dataclasses.asdict(self)), sort_keys=False, allow_unicode=True)


def json_ready(x):
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Defaults <- YAML file <- `key=value` overrides, validated into an ExperimentConfig."""
    try:
        merged = OmegaConf.structured(ExperimentConfig)
        if path is not None:
            path = Path(path)
            if not path.exists():
                raise FileNotFoundError(f"experiment config {path} does not exist")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like key=value, got {bad}")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        where = f" ({path})" if path else ""
        raise ValueError(f"experiment config{where}: {str(e).splitlines()[0]} "
                         f"[key: {getattr(e, 'full_key', '?')}]") from None
