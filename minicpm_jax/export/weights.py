"""The tensors an export writes: HF layout, ternary QAT applied, GGUF names and llama.cpp's q/k row order.

One tensor at a time (a stacked layer leaf is sliced per layer on the device), so exporting an 8B model never holds
more than one HF tensor in host float32.

Conventions (edge-export.md §1.1): GGUF tensors are HF `[out, in]` numpy arrays (ggml reverses the dims, which is
what llama.cpp expects, so no transpose); `q_proj`/`k_proj` rows are permuted from HF's rotate-half layout to the
adjacent-pair layout of llama.cpp's `LLAMA_ROPE_TYPE_NORM` (arch `minicpm`), with n_kv_heads for k.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

from minicpm_jax.config import ModelConfig
from minicpm_jax.convert.hf import TensorSpec, tensor_specs
from minicpm_jax.quant import ternary_values

# HF name (layer part with {i}) -> GGUF name ({i} -> blk index)
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# Input dims of each kernel in our layout (o_proj contracts [heads, head_dim]); these are the QAT matrices.
_KERNEL_IN_DIMS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1}
ROPE_FACTOR_NAMES = ("rope_factors_long.weight", "rope_factors_short.weight")


@dataclasses.dataclass(frozen=True)
class ExportTensor:
    """One tensor of the export: where it comes from and what it is called in each format.

    kind: "matrix" (attention/MLP, ternary-quantised under QAT), "embed" (token_embd / output) or "vector".
    shape: HF numpy shape ([out, in] for matrices).
    """

    gguf_name: str
    hf_name: str
    kind: str
    shape: tuple[int, ...]
    spec: Optional[TensorSpec]
    layer: Optional[int]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp adjacent-pair rows (llama.cpp `LlamaModel.permute`). w: [n_head*D, in]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`: llama.cpp rows back to HF rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_tensors(cfg: ModelConfig) -> list[ExportTensor]:
    """Every model tensor, layer-major like an HF checkpoint (rope factor tensors are added by the GGUF writer)."""
    per_layer, top, tail = [], [], []
    for spec in tensor_specs(cfg):
        kind = _kind(spec)
        if spec.layered:
            for i, name in enumerate(spec.names(cfg.num_hidden_layers)):
                per_layer.append(ExportTensor(_GGUF_NAMES[spec.hf_name].format(i=i), name, kind, spec.hf_shape,
                                              spec, i))
        else:
            t = ExportTensor(_GGUF_NAMES[spec.hf_name], spec.hf_name, kind, spec.hf_shape, spec, None)
            (top if spec.hf_name == "model.embed_tokens.weight" else tail).append(t)
    per_layer.sort(key=lambda t: t.layer)          # stable: keeps the q, k, v, o, ... order inside a layer
    return top + per_layer + tail


def _kind(spec: TensorSpec) -> str:
    if spec.path[-1] == "kernel":
        return "matrix"
    if spec.path in (("embed_tokens",), ("lm_head",)):
        return "embed"
    return "vector"


def ternary_group(cfg: ModelConfig) -> Optional[int]:
    """The QAT scale group of a ternary model (-1 = per output channel), None for a full-precision one."""
    return cfg.quant_group_size if cfg.weight_quant == "ternary" else None


def ternary_block(w: np.ndarray, rtol: float = 1e-3) -> Optional[int]:
    """For a matrix w [out, in] that already holds ternary values s·{-1, 0, 1} (BitCPM's fake-quantized checkpoint
    format): the largest run of inputs sharing one magnitude, -1 when it is the whole row; None if w is not ternary.
    """
    a = np.abs(w.astype(np.float32, copy=False))
    n_in = a.shape[-1]
    for b in (n_in, 1024, 512, 256, 128, 64, 32, 16, 8):
        if b > n_in or n_in % b:
            continue
        blocks = a.reshape(a.shape[0], n_in // b, b)
        hi = blocks.max(-1)
        lo = np.where(blocks > 0, blocks, np.inf).min(-1)
        if np.all((hi == 0) | (hi <= lo * (1 + rtol))):
            return -1 if b == n_in else b
    return None


def detect_ternary_group(cfg: ModelConfig, params) -> Optional[int]:
    """The scale group of a checkpoint whose matrices are already ternary-valued (layer 0 is inspected), else None.

    Lets a BitCPM-style HF checkpoint (loaded with weight_quant="none") get the same TQ / fallback decisions as a
    QAT config: the smallest group over the matrices, -1 meaning one scale per row.
    """
    groups = []
    for t in export_tensors(cfg):
        if t.kind == "matrix" and t.layer == 0:
            g = ternary_block(hf_array(cfg, params, t))
            if g is None:
                return None
            groups.append(g)
    finite = [g for g in groups if g != -1]
    return min(finite) if finite else -1


def hf_array(cfg: ModelConfig, params, t: ExportTensor) -> np.ndarray:
    """The float32 HF-layout value of one tensor: what the model computes with.

    Under ternary QAT (`cfg.weight_quant == "ternary"`) attention/MLP matrices are their ternary values
    `codes * scale` (quant.ternary_values), which is what the QAT forward pass multiplies by.
    """
    leaf = params
    for p in t.spec.path:
        leaf = leaf[p]
    x = leaf[t.layer] if t.layer is not None else leaf
    if t.kind == "matrix" and cfg.weight_quant == "ternary":
        x = ternary_values(x, _KERNEL_IN_DIMS[t.spec.path[-2]], cfg.quant_group_size)
    x = np.asarray(jax.device_get(x), dtype=np.float32)
    return np.ascontiguousarray(t.spec.to_hf(x), dtype=np.float32)


def qk_heads(cfg: ModelConfig, gguf_name: str) -> Optional[int]:
    """The head count whose rows llama.cpp's rope permutes (q: n_head, k: n_kv_head); None for other tensors."""
    if gguf_name.endswith("attn_q.weight"):
        return cfg.num_attention_heads
    if gguf_name.endswith("attn_k.weight"):
        return cfg.num_key_value_heads
    return None


def gguf_array(cfg: ModelConfig, params, t: ExportTensor, permute: bool = True) -> np.ndarray:
    """`hf_array` with q/k rows in llama.cpp's rope order (unless permute=False: the negative control)."""
    w = hf_array(cfg, params, t)
    n_head = qk_heads(cfg, t.gguf_name) if permute else None
    return w if n_head is None else permute_qk(w, n_head)
