"""Which attention a pass takes, decided in one place for the model, the loss, the loop, the dry run and decoding.

    plan = plan_attention(cfg, "auto", kv_len=4096)
    plan.sparse        # True: this pass can take InfLLM v2 (so rows must hold one document each)

Modes: "dense" always dense; "sparse" always InfLLM v2 (needs `cfg.sparse_config`); "auto" follows MiniCPM4: dense
below `sparse_config.dense_len` keys, InfLLM v2 from there on. The decision is static (shapes only); when a pass
knows each row's true length (prefill), "auto" chooses per row among the rows that reach `dense_len`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import numpy as np

if TYPE_CHECKING:   # a type only: the sparse package (imported by config) imports this module
    from minicpm_jax.config import ModelConfig

ATTENTION_MODES = ("auto", "dense", "sparse")


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """mode: as asked; sparse: the pass may run InfLLM v2 (static); per_row: "auto" with per-row lengths may still
    keep short rows dense; impl: the InfLLM v2 implementation (`cfg.sparse_impl`)."""

    mode: str
    sparse: bool
    per_row: bool
    impl: str

    @property
    def one_document_per_row(self) -> bool:
        """Batches for this pass must hold one document per row (InfLLM v2's block grid starts at position 0)."""
        return self.sparse


def check_mode(mode: str) -> None:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")


def plan_attention(cfg: ModelConfig, mode: str, kv_len: int) -> AttentionPlan:
    """The attention plan of a pass over (or a cache of) `kv_len` keys."""
    check_mode(mode)
    scfg = cfg.sparse_config
    if mode == "sparse" and scfg is None:
        raise ValueError("attention='sparse' needs ModelConfig.sparse_config (InfLLM v2 settings); it is None")
    if mode == "dense" or scfg is None:
        return AttentionPlan(mode, False, False, cfg.sparse_impl)
    if mode == "sparse":
        return AttentionPlan(mode, True, False, cfg.sparse_impl)
    sparse = scfg.use_sparse(kv_len)
    return AttentionPlan(mode, sparse, sparse and not scfg.always_sparse, cfg.sparse_impl)


def check_one_document_per_row(segment_ids) -> None:
    """Every row is one document followed only by padding (segment id 0); raises ValueError naming the rows.

    Block and kernel boundaries, the init block and the window are all defined from position 0 of a sequence; in a
    packed row they would straddle documents, and the MiniCPM4 kernels never define that case (their varlen API
    restarts the block grid per sequence). Needs concrete ids: inside jit the sparse path takes no segment ids.
    """
    if segment_ids is None:
        return
    if isinstance(segment_ids, jax.core.Tracer):
        raise ValueError(
            "InfLLM v2 sparse attention needs one document per row: pass segment_ids=None (packed sequences are "
            "not supported on the sparse path; train long-context sparse batches unpacked, or use dense attention)")
    seg = np.asarray(segment_ids)
    if seg.ndim != 2:
        raise ValueError(f"segment_ids must be [batch, seq], got shape {seg.shape}")
    pad = seg == 0
    ok = ((seg == seg[:, :1]) | pad) & (np.maximum.accumulate(pad, axis=1) <= pad)
    if not ok.all():
        rows = np.nonzero(~ok.all(axis=1))[0][:5].tolist()
        raise ValueError(f"InfLLM v2 sparse attention needs one document per row, but rows {rows} of the batch pack "
                         "several documents; set data.pack=false for long-context sparse training "
                         "(each row one document, split at seq_len), or use dense attention")
