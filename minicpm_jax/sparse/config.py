"""InfLLM v2 sparse-attention configuration (the `sparse_config` block of a MiniCPM `config.json`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

_HF_FIELDS = ("block_size", "kernel_size", "kernel_stride", "init_blocks", "window_size", "topk", "dense_len", "use_nope")


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """InfLLM v2 (MiniCPM4, June 2025 semantics). Field names follow the HF `sparse_config` dict.

    block_size:    tokens per KV block that top-k selects (64).
    kernel_size:   tokens per mean-pooled key kernel used only for scoring (32).
    kernel_stride: stride between kernels (16).
    init_blocks:   leading blocks always attended; they count towards `topk` (1).
    window_size:   local window in tokens, always attended and excluded from top-k (2048 -> 32 blocks).
    topk:          blocks picked per (KV group, query token), init blocks included (64).
    dense_len:     total KV length below which attention stays dense (8192); -1 means always sparse.
    use_nope:      score blocks with pre-RoPE q/k instead of post-RoPE.
    lse_approx:    normalise kernel scores with the LSE of the coarse (4x kernel, 4x stride) kernels (§2.2).
    extra:         unknown keys of the HF dict, kept so that a config round-trips.
    """

    block_size: int = 64
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 64
    dense_len: int = 8192
    use_nope: bool = False
    lse_approx: bool = False
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=True)

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"sparse_config: {msg}")

        for name in ("block_size", "kernel_size", "kernel_stride", "window_size", "topk"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{name} must be a positive int, got {v!r}")
        need(isinstance(self.init_blocks, int) and self.init_blocks >= 0, f"init_blocks must be an int >= 0, got {self.init_blocks!r}")
        need(isinstance(self.dense_len, int) and (self.dense_len >= 0 or self.dense_len == -1),
             f"dense_len must be >= 0 or -1 (always sparse), got {self.dense_len!r}")
        need(self.kernel_size >= self.kernel_stride,
             f"kernel_size ({self.kernel_size}) must be >= kernel_stride ({self.kernel_stride}), or keys would be skipped")
        need(self.block_size % self.kernel_stride == 0,
             f"block_size ({self.block_size}) must be a multiple of kernel_stride ({self.kernel_stride})")
        need(self.kernel_size % self.kernel_stride == 0,
             f"kernel_size ({self.kernel_size}) must be a multiple of kernel_stride ({self.kernel_stride})")
        need(self.window_size % self.block_size == 0,
             f"window_size ({self.window_size}) must be a multiple of block_size ({self.block_size})")
        need(self.topk > self.init_blocks,
             f"topk ({self.topk}) counts the init blocks ({self.init_blocks}) and must exceed them")

    @property
    def window_blocks(self) -> int:
        """Blocks in the local window: `window_size // block_size` (32 for MiniCPM4)."""
        return self.window_size // self.block_size

    @property
    def always_sparse(self) -> bool:
        return self.dense_len == -1

    def use_sparse(self, kv_len: int) -> bool:
        """The MiniCPM4 switch: dense while the total KV length is below `dense_len`."""
        return self.always_sparse or kv_len >= self.dense_len

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "SparseConfig":
        if not isinstance(d, Mapping):
            raise ValueError(f"sparse_config must be a dict or null, got {type(d).__name__}")
        known = {k: d[k] for k in _HF_FIELDS if k in d}
        lse = d.get("lse_approx", d.get("use_lse_approx", False))
        extra = {k: v for k, v in d.items() if k not in _HF_FIELDS and k not in ("lse_approx", "use_lse_approx")}
        return cls(**known, lse_approx=bool(lse), extra=extra)

    def to_hf_dict(self) -> dict:
        out = {k: getattr(self, k) for k in _HF_FIELDS}
        if self.lse_approx:
            out["lse_approx"] = True
        out.update(self.extra)
        return out
