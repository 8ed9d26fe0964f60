"""Where weights come from, decided once: a training run directory (a step of it) or an HF checkpoint directory.

    w = load_weights("runs/tiny")                   # the newest restorable checkpoint of a training run
    w = load_weights("runs/tiny", step=100)         # one step of it
    w = load_weights("path/to/MiniCPM4-0.5B")       # HF: config.json + *.safetensors (+ tokenizer files)
    w.cfg, w.params, w.tokenizer, w.step, w.describe()

`train.init_from`, `minicpm eval`, `minicpm export` and `minicpm generate` all start here, so "HF directory or
training run?" has one answer everywhere: a directory with config.json is an HF checkpoint, one with config.yaml is
a run (`minicpm_jax.checkpoint.run_paths`); anything else is an error that says what was expected.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

import jax.numpy as jnp
import yaml

from data_pipeline.tokenizer import Tokenizer
from minicpm_jax.checkpoint import Checkpointer, run_paths
from minicpm_jax.config import ModelConfig
from minicpm_jax.convert.hf import load_hf, read_config
from minicpm_jax.model import abstract_params, param_logical_axes
from minicpm_jax.model_spec import ModelSection
from minicpm_jax.sharding import logical_shardings, make_mesh, with_shardings

HF_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


@dataclasses.dataclass
class Weights:
    """Loaded weights. kind: "hf" | "run"; step: the run checkpoint restored (None for HF); attention: the run's
    `model.attention` ("auto" for HF checkpoints); tokenizer: None when the source has none."""

    cfg: ModelConfig
    params: Any
    tokenizer: Optional[Tokenizer]
    source: Path
    kind: str
    step: Optional[int] = None
    attention: str = "auto"

    def describe(self) -> str:
        if self.kind == "run":
            return f"training run {self.source}, checkpoint step {self.step}"
        return f"HF checkpoint {self.source}"


def source_kind(path: str | Path) -> str:
    """"hf" or "run" for a weight source directory; a clear error for anything else."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise ValueError(f"checkpoint {p} is a file; give an HF checkpoint directory (config.json + *.safetensors) "
                         "or a training run directory (config.yaml + checkpoints/)")
    if (p / "config.json").is_file():
        if not any(p.glob("*.safetensors")):
            raise FileNotFoundError(f"{p} has config.json but no *.safetensors: not a complete HF checkpoint")
        return "hf"
    if run_paths(p)["config"].is_file():
        return "run"
    raise FileNotFoundError(f"{p}: neither an HF checkpoint directory (config.json + *.safetensors) nor a training "
                            "run directory (config.yaml + checkpoints/)")


def run_model_section(run_dir: str | Path) -> ModelSection:
    """The model section a training run recorded in its config.yaml."""
    path = run_paths(run_dir)["config"]
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("model", {}), dict):
        raise ValueError(f"{path}: expected a mapping with a 'model' section")
    return ModelSection.from_dict(doc.get("model", {}))


def source_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a weight source without loading its weights."""
    return read_config(path) if source_kind(path) == "hf" else run_model_section(path).build()


def find_tokenizer(directory: str | Path) -> Optional[Tokenizer]:
    """The tokenizer stored with a checkpoint (tokenizer.model / tokenizer.json), or None."""
    d = Path(directory)
    if (d / "tokenizer.model").is_file() or (d / "tokenizer.json").is_file():
        return Tokenizer.load(d)
    return None


def load_weights(path: str | Path, *, step: Optional[int] = None, mesh=None, dtype=None) -> Weights:
    """Weights of an HF checkpoint directory or a training run (newest restorable step unless `step`).

    mesh: parameters are placed with their logical shardings on it (default: all local devices as one fsdp axis).
    dtype: HF only, the dtype to load in (default: the checkpoint's own `torch_dtype`, so bf16 stays bf16).
    """
    p = Path(path)
    kind = source_kind(p)
    if kind == "hf":
        if step is not None:
            raise ValueError(f"{p} is an HF checkpoint directory: it has no steps (step={step} given)")
        cfg, params = load_hf(p, dtype=dtype or HF_DTYPES.get(_hf_torch_dtype(p), jnp.float32), mesh=mesh)
        return Weights(cfg, params, find_tokenizer(p), p, "hf")
    section = run_model_section(p)
    cfg = section.build()
    step, params = _restore_run_params(p, cfg, step, mesh)
    return Weights(cfg, params, find_tokenizer(run_paths(p)["tokenizer"]), p, "run", step, section.attention)


def _restore_run_params(run_dir: Path, cfg: ModelConfig, step: Optional[int], mesh):
    ckpt_dir = run_paths(run_dir)["checkpoints"]
    ap = abstract_params(cfg)
    mesh = mesh or make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    target = with_shardings(ap, logical_shardings(ap, param_logical_axes(cfg), mesh))
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(f"{ckpt_dir}: no committed checkpoint")
        if step is None:
            step, params, _, skipped = ckpt.restore_latest(target, params_only=True)
            for e in skipped:
                print(f"WARNING: {e}. Falling back to the previous checkpoint.", flush=True)
        else:
            if step not in steps:
                raise FileNotFoundError(f"{ckpt_dir}: no step {step} (have {steps})")
            params, _ = ckpt.restore(step, target, params_only=True)
    finally:
        ckpt.close()
    return step, params


def _hf_torch_dtype(path: Path) -> Optional[str]:
    try:
        return json.loads((path / "config.json").read_text()).get("torch_dtype")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
