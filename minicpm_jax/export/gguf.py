"""JAX params -> a GGUF file that llama.cpp runs as arch `minicpm` with the same logits (edge-export.md).

    report = to_gguf("model-q8_0.gguf", cfg, params, tokenizer, qtype="q8_0")

What is written (edge-export.md §0, §1.1):
- `general.architecture = minicpm`; the Llama-style hyperparameters under `minicpm.*`; the three μP scalars
  `minicpm.embedding_scale = scale_emb`, `minicpm.residual_scale = scale_depth/sqrt(L)`,
  `minicpm.logit_scale = hidden_size/dim_model_base` (llama.cpp divides logits by it). Missing keys would silently
  default to 12, 1.4/sqrt(L) and 256/n_embd, so all three are always written.
- tensors in HF `[out, in]` layout with q/k rows permuted for llama.cpp's rope (weights.py); a tied head writes no
  `output.weight` (llama.cpp reuses `token_embd`).
- LongRoPE: `rope.scaling.type = longrope`, F32 `rope_factors_{long,short}.weight`, `original_context_length`, and
  `attn_factor` when HF's cos/sin multiplier is not 1. llama.cpp picks the long factors when its allocated context
  exceeds `original_context_length`; HF picks them when max(max_position_embeddings, length) exceeds it. When
  max_position_embeddings > original, HF always uses the long factors, so the file carries the long factors in both
  slots: llama.cpp then matches HF at every context size.
- the tokenizer as llama.cpp's SentencePiece vocabulary (gguf_tokenizer.py), or `no_vocab` without one.
- tensor types per `--qtype` with logged per-tensor fallbacks (qtypes.py). A ternary-QAT model
  (`cfg.weight_quant == "ternary"`) is exported with its ternary weights; TQ1_0/TQ2_0 store them losslessly.
  `q4_k_m` is produced by llama.cpp's own quantizer from an F32 export.

The file is streamed tensor by tensor into a temporary name and renamed when complete.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Optional

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from minicpm_jax.config import ModelConfig
from minicpm_jax.export import gguf_tokenizer, llamacpp, qtypes
from minicpm_jax.export.files import atomic_output
from minicpm_jax.export.weights import (ROPE_FACTOR_NAMES, ExportTensor, detect_ternary_group, export_tensors,
                                        gguf_array, ternary_group)
from minicpm_jax.rope import longrope_scaling

log = logging.getLogger("minicpm_jax.export")
ARCH = "minicpm"


@dataclasses.dataclass
class GGUFExport:
    """What an export wrote. type_counts: GGML type name -> number of tensors; fallbacks: (tensor, reason)."""

    path: Path
    qtype: str
    n_tensors: int
    type_counts: dict[str, int]
    fallbacks: list[tuple[str, str]]
    nbytes: int
    vocab: str                      # "llama" (SentencePiece) or "no_vocab"

    def summary(self) -> str:
        types = ", ".join(f"{k} x{v}" for k, v in sorted(self.type_counts.items()))
        return (f"{self.path}: {self.nbytes / 2**20:.1f} MiB, {self.n_tensors} tensors ({types}), vocab "
                f"{self.vocab}, {len(self.fallbacks)} per-tensor fallback(s)")


@dataclasses.dataclass(frozen=True)
class _Planned:
    name: str
    shape: tuple[int, ...]          # numpy shape
    choice: qtypes.TypeChoice
    tensor: Optional[ExportTensor]  # None for the rope factor tensors
    rope_values: Optional[np.ndarray] = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quants.quant_shape_to_byte_shape(self.shape, self.choice.ggml_type), dtype=np.int64))


def rope_factor_arrays(cfg: ModelConfig) -> Optional[dict[str, np.ndarray]]:
    """The two LongRoPE factor tensors as the file stores them (see the module docstring), or None."""
    rs = cfg.rope_scaling
    if rs is None:
        return None
    long = np.asarray(rs.long_factor, np.float32)
    always_long = cfg.max_position_embeddings > rs.original_max_position_embeddings
    short = long if always_long else np.asarray(rs.short_factor, np.float32)
    return {"rope_factors_long.weight": long, "rope_factors_short.weight": short}


def _plan(cfg: ModelConfig, qtype: str, group: Optional[int]) -> list[_Planned]:
    """Name, shape and GGML type of every tensor, in file order. group: the ternary scale group (None: not ternary)."""
    plan = []
    factors = rope_factor_arrays(cfg)
    tensors = export_tensors(cfg)
    for t in tensors[:1]:                                   # token_embd first, then the global rope tensors
        plan.append(_Planned(t.gguf_name, t.shape, qtypes.choose_type(qtype, t.kind, t.shape), t))
    if factors is not None:
        for name in ROPE_FACTOR_NAMES:
            plan.append(_Planned(name, factors[name].shape, qtypes.TypeChoice(GGMLQuantizationType.F32), None,
                                 factors[name]))
    for t in tensors[1:]:
        plan.append(_Planned(t.gguf_name, t.shape,
                             qtypes.choose_type(qtype, t.kind, t.shape, group if t.kind == "matrix" else None), t))
    return plan


def _add_hparams(w: gguf.GGUFWriter, cfg: ModelConfig, qtype: str, name: str) -> None:
    w.add_name(name)
    w.add_type("model")
    w.add_file_type(int(qtypes.FILE_TYPE[qtype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    # μP scalars: llama.cpp's minicpm graph (= granite) multiplies embeddings, scales branches, divides logits.
    w.add_embedding_scale(float(cfg.scale_emb))
    w.add_residual_scale(float(cfg.residual_scale))
    w.add_logit_scale(float(cfg.width_mult))
    rs = cfg.rope_scaling
    if rs is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        w.add_rope_scaling_orig_ctx_len(int(rs.original_max_position_embeddings))
        attn = longrope_scaling(cfg)
        if attn != 1.0:
            w.add_rope_scaling_attn_factors(float(attn))   # HF multiplies cos and sin by it; so does llama.cpp


def to_gguf(path: str | os.PathLike, cfg: ModelConfig, params, tokenizer: Any = None, qtype: str = "f16", *,
            name: Optional[str] = None, allow_tokenizer_mismatch: bool = False, permute_qk: bool = True,
            n_threads: Optional[int] = None) -> GGUFExport:
    """Write a GGUF file for llama.cpp.

    Args:
      path: output file (written atomically).
      cfg, params: the model (params as from `init_params` / `load_hf`; any float dtype).
      tokenizer: a `data_pipeline.tokenizer.Tokenizer` (SentencePiece), or None for a `no_vocab` file that
        llama.cpp can evaluate on token ids but cannot tokenize text with.
      qtype: one of qtypes.ALL_QTYPES.
      permute_qk: False only for the negative-control test (writes HF's rotate-half q/k rows unchanged).
      n_threads: threads for llama.cpp's quantizer (q4_k_m only).
    Returns: a GGUFExport report (also logged).
    """
    qtypes.check_qtype(qtype)
    path = Path(path)
    if qtype in qtypes.LLAMACPP_QTYPES:
        return _via_llamacpp(path, cfg, params, tokenizer, qtype, name=name,
                             allow_tokenizer_mismatch=allow_tokenizer_mismatch, n_threads=n_threads)
    group = _ternary_group_for(cfg, params, qtype)
    if cfg.sparse_config is not None:
        log.info("sparse_config is not represented in GGUF: llama.cpp runs dense attention at every length "
                 "(HF also runs dense below dense_len=%d)", cfg.sparse_config.dense_len)
    vocab = None
    if tokenizer is not None:
        vocab = gguf_tokenizer.build_vocab(tokenizer, cfg.vocab_size, allow_mismatch=allow_tokenizer_mismatch)
        _check_special_ids(cfg, vocab)
    else:
        log.warning("no tokenizer: writing a 'no_vocab' GGUF (llama.cpp can run token ids but not text)")
    plan = _plan(cfg, qtype, group)
    fallbacks = [(p.name, p.choice.fallback_reason) for p in plan if p.choice.fallback_reason]
    for tname, reason in fallbacks:
        log.warning("%s: %s", tname, reason)

    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        try:
            _add_hparams(w, cfg, qtype, name or "MiniCPM4")
            if vocab is not None:
                gguf_tokenizer.add_vocab(w, vocab, cfg.pad_token_id)
            else:
                gguf_tokenizer.add_no_vocab(w)
            for p in plan:
                # logical shape with a non-uint8 dtype: gguf computes nothing from bytes, we give nbytes ourselves
                w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.choice.ggml_type)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for p in plan:
                x = p.rope_values if p.tensor is None else gguf_array(cfg, params, p.tensor, permute=permute_qk)
                data = gguf.quants.quantize(np.ascontiguousarray(x, np.float32), p.choice.ggml_type)
                w.write_tensor_data(data)
        finally:
            w.close()
    counts = collections.Counter(p.choice.ggml_type.name for p in plan)
    report = GGUFExport(path=path, qtype=qtype, n_tensors=len(plan), type_counts=dict(counts), fallbacks=fallbacks,
                        nbytes=path.stat().st_size, vocab="llama" if vocab is not None else "no_vocab")
    if vocab is not None and vocab.n_padding:
        log.info("vocabulary: %d tokenizer pieces + %d [PAD] rows = %d embedding rows",
                 cfg.vocab_size - vocab.n_padding, vocab.n_padding, cfg.vocab_size)
    log.info("wrote %s", report.summary())
    return report


def _ternary_group_for(cfg: ModelConfig, params, qtype: str) -> Optional[int]:
    """The ternary scale group that decides TQ vs fallback: the QAT config's, or for TQ exports of a plain config,
    the one found in already-ternary weights (a BitCPM-style checkpoint). None: not a ternary model."""
    group = ternary_group(cfg)
    if qtype not in ("tq1_0", "tq2_0") or group is not None:
        return group
    group = detect_ternary_group(cfg, params)
    if group is None:
        log.warning("EXPORTING A FULL-PRECISION MODEL AS %s: every matrix is ternarised by max|w| per 256 weights "
                    "with no training, which is a different (much worse) model. Export a model trained with "
                    "weight_quant='ternary' (BitCPM-style QAT) for a faithful ternary file.", qtype.upper())
    else:
        log.info("the checkpoint's matrices are already ternary (scale group %s): exporting them as they are",
                 "per row" if group == -1 else group)
    return group


def _check_special_ids(cfg: ModelConfig, vocab: gguf_tokenizer.GGUFVocab) -> None:
    """llama.cpp stops at the tokenizer's EOS and `<|im_end|>`; say so when the model config names other ids."""
    if cfg.bos_token_id is not None and cfg.bos_token_id != vocab.bos_id:
        log.warning("config bos_token_id %d differs from the tokenizer's BOS %d; the GGUF uses the tokenizer's",
                    cfg.bos_token_id, vocab.bos_id)
    other = sorted(set(cfg.eos_ids) - {vocab.eos_id, vocab.eot_id})
    if other:
        log.warning("config eos ids %s are neither the tokenizer's EOS (%d) nor <|im_end|> (%s): llama.cpp will not "
                    "stop generating at them", other, vocab.eos_id, vocab.eot_id)


def _via_llamacpp(path: Path, cfg: ModelConfig, params, tokenizer, qtype: str, **kw) -> GGUFExport:
    """K-quants: gguf-py cannot write them, so export F32 and run llama.cpp's quantizer (its own tensor recipe)."""
    n_threads = kw.pop("n_threads")
    f32_tmp = path.with_name(f".{path.name}.f32-{os.getpid()}")      # never left behind
    try:
        to_gguf(f32_tmp, cfg, params, tokenizer, "f32", **kw)
        with atomic_output(path) as tmp:
            lines = llamacpp.quantize(f32_tmp, tmp, qtype, n_threads=n_threads)
    finally:
        f32_tmp.unlink(missing_ok=True)
    reader = gguf.GGUFReader(path)
    counts = collections.Counter(t.tensor_type.name for t in reader.tensors)
    report = GGUFExport(path=path, qtype=qtype, n_tensors=len(reader.tensors), type_counts=dict(counts),
                        fallbacks=[(line.split()[0], line) for line in lines], nbytes=path.stat().st_size,
                        vocab="llama" if tokenizer is not None else "no_vocab")
    log.info("wrote %s (llama.cpp quantizer)", report.summary())
    return report
