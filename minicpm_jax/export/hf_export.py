"""JAX params -> a Hugging Face MiniCPM checkpoint directory in MiniCPM's published format.

    export_hf("out/MiniCPM4-tiny", cfg, params, tokenizer)

Contents: `config.json` (`architectures: ["MiniCPMForCausalLM"]`, `model_type: "minicpm"`, the HF field names, and an
`auto_map` to `configuration_minicpm.MiniCPMConfig` / `modeling_minicpm.MiniCPMForCausalLM` as OpenBMB's checkpoints
have), `generation_config.json`, `model.safetensors` (sharded with an index above 5 GB), and the tokenizer files
(`tokenizer.model`, `tokenizer.json`, `tokenizer_config.json` with the tokenizer's `chat_template` when it has one,
`special_tokens_map.json`).

Who loads it:
- `minicpm_jax.load_hf` reads it back bit-exact.
- vLLM and SGLang implement `MiniCPMForCausalLM` natively and load the safetensors directly; they still read
  config.json through transformers, which needs the remote-code files named in `auto_map` (see next line).
- transformers (`trust_remote_code=True`): MiniCPM is not built into transformers, so copy OpenBMB's
  `configuration_minicpm.py` and `modeling_minicpm.py` (from any openbmb/MiniCPM4-* repository) next to the weights.
  This repository does not ship OpenBMB's modeling code; `export_hf(..., remote_code_dir=DIR)` copies those two
  files from a directory you have (the CLI does so automatically when the source checkpoint contains them).

A ternary-QAT model (`weight_quant == "ternary"`) is written with its ternary weights (codes × scale) in full
precision, as BitCPM4 ships: any MiniCPM loader then runs the ternary model without knowing about QAT.
The directory appears only when complete (written beside it, then renamed).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp

from minicpm_jax.config import ModelConfig
from minicpm_jax.convert.hf import replace_dir, save_hf
from minicpm_jax.export.files import check_output_path
from minicpm_jax.export.weights import _KERNEL_IN_DIMS
from minicpm_jax.quant import ternary_values

log = logging.getLogger("minicpm_jax.export")
REMOTE_CODE_FILES = ("configuration_minicpm.py", "modeling_minicpm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_minicpm.MiniCPMConfig",
    "AutoModel": "modeling_minicpm.MiniCPMModel",
    "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
}


def exported_params(cfg: ModelConfig, params) -> tuple[ModelConfig, dict]:
    """(cfg, params) as a plain checkpoint holds them: for a ternary-QAT model the kernels become their ternary
    values and `weight_quant` is off (the values are already quantized); otherwise the inputs unchanged."""
    if cfg.weight_quant != "ternary":
        return cfg, params

    def fake_quant(path, x):                 # on device, leaf by leaf: no host copy of the whole model
        keys = [k.key for k in path]
        if keys[-1] != "kernel":
            return x
        q = functools.partial(ternary_values, in_dims=_KERNEL_IN_DIMS[keys[-2]], group_size=cfg.quant_group_size)
        return jnp.stack([q(w) for w in x]) if keys[0] == "layers" else q(x)

    return cfg.replace(weight_quant="none"), jax.tree_util.tree_map_with_path(fake_quant, params)


def export_hf(out_dir: str | os.PathLike, cfg: ModelConfig, params, tokenizer: Any = None, *,
              dtype: Optional[str] = None, remote_code_dir: Optional[str | os.PathLike] = None,
              max_shard_bytes: Optional[int] = None) -> Path:
    """Write an HF MiniCPM checkpoint directory (see module docstring). Returns its path.

    Args:
      dtype: safetensors dtype ("float32", "bfloat16", "float16"); default cfg.param_dtype.
      remote_code_dir: a directory holding OpenBMB's configuration_minicpm.py / modeling_minicpm.py to copy along.
    """
    out = Path(out_dir)
    check_output_path(out, directory=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    plain_cfg, plain_params = exported_params(cfg, params)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        stage = work / out.name
        kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        save_hf(stage, plain_cfg, plain_params, dtype=dtype, **kw)
        hf_cfg = json.loads((stage / "config.json").read_text())
        hf_cfg["auto_map"] = dict(AUTO_MAP)
        hf_cfg.setdefault("use_cache", True)
        (stage / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(stage)
        else:
            log.warning("HF export without a tokenizer: %s has no tokenizer files", out)
        copied = _copy_remote_code(remote_code_dir, stage)
        if not copied:
            log.info("for transformers (trust_remote_code=True), copy OpenBMB's %s into %s; vLLM/SGLang load "
                     "MiniCPMForCausalLM natively", " and ".join(REMOTE_CODE_FILES), out)
        replace_dir(stage, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if cfg.weight_quant == "ternary":
        log.info("ternary-QAT model written with its ternary weights (fake-quantized format, as BitCPM4)")
    log.info("wrote HF checkpoint %s", out)
    return out


def _copy_remote_code(src: Optional[str | os.PathLike], dst: Path) -> bool:
    if src is None:
        return False
    src = Path(src)
    present = [f for f in REMOTE_CODE_FILES if (src / f).is_file()]
    if len(present) != len(REMOTE_CODE_FILES):
        return False
    for f in present:
        shutil.copy2(src / f, dst / f)
    return True
