"""What an export starts from: an HF checkpoint directory or an orbax training run, plus its tokenizer.

    cfg, params, tokenizer = load_for_export("runs/tiny")        # tokenizer may be None

- HF directory (config.json + *.safetensors): loaded with `mc.load_hf` in the checkpoint's own dtype (bf16 stays bf16,
  so an 8B model is not doubled in memory; every exported tensor is widened to float32 one at a time). A
  `tokenizer.model` / `tokenizer.json` in the same directory is loaded with data_pipeline's Tokenizer.
- anything else is taken as an orbax training run and handed to `minicpm_jax.train.checkpoint.load_for_export`,
  which returns the same triple (the training config's `weight_quant` included, so ternary runs export ternary).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import jax.numpy as jnp

from minicpm_jax.config import ModelConfig

_TORCH_DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def load_tokenizer(path: str | os.PathLike) -> Any:
    """data_pipeline's Tokenizer from a directory or a tokenizer.model / tokenizer.json file."""
    from data_pipeline.tokenizer import Tokenizer

    return Tokenizer.load(path)


def find_tokenizer(directory: Path) -> Optional[Any]:
    if (directory / "tokenizer.model").is_file() or (directory / "tokenizer.json").is_file():
        return load_tokenizer(directory)
    return None


def load_for_export(path: str | os.PathLike) -> tuple[ModelConfig, dict, Optional[Any]]:
    """(cfg, params, tokenizer or None) from an HF checkpoint directory or an orbax training run directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise ValueError(f"checkpoint {p} is a file; give an HF checkpoint directory (config.json + *.safetensors) "
                         "or an orbax training run directory")
    if is_hf_dir(p):
        from minicpm_jax.convert.hf import load_hf

        dtype = _TORCH_DTYPES.get(_torch_dtype(p), jnp.float32)
        cfg, params = load_hf(p, dtype=dtype)
        return cfg, params, find_tokenizer(p)
    if (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} has config.json but no *.safetensors: not a complete HF checkpoint")
    from minicpm_jax.train.checkpoint import load_for_export as load_run
    return load_run(p)


def _torch_dtype(path: Path) -> Optional[str]:
    try:
        return json.loads((path / "config.json").read_text()).get("torch_dtype")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
