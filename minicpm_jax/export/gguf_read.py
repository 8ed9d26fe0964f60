"""Reading an exported GGUF back: the weights llama.cpp actually runs, as JAX params, and the ternary export error.

The reference for a quantized file is our JAX forward on the file's *dequantized* weights (`gguf.quants.dequantize`),
q/k rows un-permuted: what remains between that and llama.cpp is llama.cpp quantizing activations to the weight's
dot type (edge-export.md §4).
"""

from __future__ import annotations

import os
from typing import Optional

import gguf
import jax.numpy as jnp
import numpy as np

from minicpm_jax.config import ModelConfig
from minicpm_jax.convert.hf import hf_tensors_to_params
from minicpm_jax.export.weights import export_tensors, hf_array, qk_heads, unpermute_qk
from minicpm_jax.model import forward


def read_tensors(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    """GGUF tensor name -> (dequantized float32 numpy array in numpy/HF shape, stored GGML type)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))        # ggml ne -> numpy shape
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        out[t.name] = (np.ascontiguousarray(x.reshape(shape)), t.tensor_type)
    return out


def dequantized_hf_tensors(path: str | os.PathLike, cfg: ModelConfig, stored: Optional[dict] = None
                           ) -> dict[str, np.ndarray]:
    """The file's weights as HF tensors (q/k rows back in HF order), for `hf_tensors_to_params`.
    stored: `read_tensors(path)` when the caller already has it."""
    stored = read_tensors(path) if stored is None else stored
    out = {}
    for t in export_tensors(cfg):
        if t.gguf_name not in stored:
            raise ValueError(f"{path}: tensor {t.gguf_name!r} (HF {t.hf_name}) is missing")
        out[t.hf_name] = _hf_rows(cfg, t.gguf_name, stored[t.gguf_name][0])
    return out


def _hf_rows(cfg: ModelConfig, gguf_name: str, w: np.ndarray) -> np.ndarray:
    """q/k rows from llama.cpp's rope order back to HF's; other tensors unchanged."""
    n_head = qk_heads(cfg, gguf_name)
    return w if n_head is None else unpermute_qk(w, n_head)


def reference_model(path: str | os.PathLike, cfg: ModelConfig, hf_tensors: Optional[dict] = None
                    ) -> tuple[ModelConfig, dict]:
    """(cfg, params) whose JAX forward is the exact reference for the GGUF at `path`.

    The weights are the file's dequantized ones; `weight_quant` is switched off because a ternary model's file
    already holds its ternary values (quantizing them again would change their scale).
    """
    ref_cfg = cfg.replace(weight_quant="none", param_dtype="float32", dtype="float32")
    if hf_tensors is None:
        hf_tensors = dequantized_hf_tensors(path, cfg)
    return ref_cfg, hf_tensors_to_params(ref_cfg, hf_tensors, dtype=jnp.float32)


def ternary_export_error(cfg: ModelConfig, params, gguf_path: str | os.PathLike,
                         input_ids: Optional[np.ndarray] = None) -> dict:
    """How far a ternary model's GGUF is from the model itself.

    Returns a dict with, per matrix, the stored type and max |dequantized - ternary weight| / max |ternary weight|
    ("weights"), their maximum over matrices ("max_weight_rel_err"; ~1e-4 to 5e-4 when TQ is lossless: the fp16
    rounding of the scale), and, given input_ids [B, T], the max abs difference between the JAX logits of the QAT
    model and of the file's weights ("max_logit_abs_err", "max_abs_logit").
    """
    if cfg.weight_quant != "ternary":
        raise ValueError("ternary_export_error: cfg.weight_quant is not 'ternary'")
    stored = read_tensors(gguf_path)
    filed = dequantized_hf_tensors(gguf_path, cfg, stored)
    per, worst = {}, 0.0
    for t in export_tensors(cfg):
        if t.kind != "matrix":
            continue
        want = hf_array(cfg, params, t)
        w, qt = filed[t.hf_name], stored[t.gguf_name][1]
        rel = float(np.abs(w - want).max() / max(np.abs(want).max(), 1e-30))
        per[t.gguf_name] = (qt.name, rel)
        worst = max(worst, rel)
    out = {"weights": per, "max_weight_rel_err": worst}
    if input_ids is not None:
        ids = jnp.asarray(input_ids, jnp.int32)
        ref_cfg, ref_params = reference_model(gguf_path, cfg, filed)
        qat = np.asarray(forward(params, cfg, ids))
        got = np.asarray(forward(ref_params, ref_cfg, ids))
        out["max_logit_abs_err"] = float(np.abs(qat - got).max())
        out["max_abs_logit"] = float(np.abs(qat).max())
    return out
