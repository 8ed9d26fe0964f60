"""InfLLM v2 sparse-attention configuration (the `sparse_config` block of a MiniCPM `config.json`)."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

_HF_FIELDS = ("block_size", "kernel_size", "kernel_stride", "init_blocks", "window_size", "topk", "dense_len", "use_nope")
VARIANTS = ("minicpm4", "minicpm4.1")
# What the current official kernels (infllmv2_cuda_impl since 2025-08-25) run for any `sparse_config`: the variant of
# an HF config that does not name one, and the default of SparseConfig.
DEFAULT_VARIANT = "minicpm4.1"
_said_default = False


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """InfLLM v2 settings. Field names follow the HF `sparse_config` dict (plus `variant` and `lse_approx`).

    block_size:    tokens per KV block that top-k selects (64).
    kernel_size:   tokens per mean-pooled key kernel used only for scoring (32).
    kernel_stride: stride between kernels (16).
    init_blocks:   leading blocks always attended (1).
    window_size:   local window in tokens (2048 -> n = 32 blocks); how it meets top-k depends on `variant`.
    topk:          top-k size per (KV group, query token) (64); see `variant`.
    dense_len:     total KV length below which attention stays dense (8192); -1 means always sparse.
    use_nope:      score blocks with pre-RoPE q/k instead of post-RoPE.
    variant:       how the window combines with top-k (spec §2.3), for a query in block qb:
                   "minicpm4"   (June 2025): init blocks +inf inside a top-`topk`, the window qb-n+1..qb (n blocks)
                                attended besides it and excluded from scoring;
                   "minicpm4.1" (official kernels since 2025-08-25): init blocks and the n+1 local blocks qb-n..qb
                                forced +inf inside a top-(`topk` + n); nothing outside the top-k is attended.
    lse_approx:    normalise each head's kernel scores by the LSE of the coarse (4x kernel, 4x stride) kernels
                   instead of the exact softmax denominator (§2.2). Default: True for "minicpm4.1", False for
                   "minicpm4" (what each variant's official code does).
    extra:         unknown keys of the HF dict, kept so that a config round-trips.

    Both variants attend "init blocks + a local band + the best-scored other blocks"; `local_blocks` and
    `topk_slots` give that form, which every implementation consumes ("minicpm4.1" with window n equals
    "minicpm4" with window n+1 and topk-1: same forced blocks, same number of scored picks).
    """

    block_size: int = 64
    kernel_size: int = 32
    kernel_stride: int = 16
    init_blocks: int = 1
    window_size: int = 2048
    topk: int = 64
    dense_len: int = 8192
    use_nope: bool = False
    variant: str = DEFAULT_VARIANT
    lse_approx: Optional[bool] = None   # None: the variant's default
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=True)

    def __post_init__(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"sparse_config: {msg}")

        need(self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.lse_approx is None:  # frozen: resolve the variant's default once, so equality and hashing see it
            object.__setattr__(self, "lse_approx", self.variant == "minicpm4.1")
        need(isinstance(self.lse_approx, bool), f"lse_approx must be true, false or null, got {self.lse_approx!r}")
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
    def local_blocks(self) -> int:
        """Blocks qb-local_blocks+1 .. qb attended besides the top-k picks: n ("minicpm4") or n + 1 ("minicpm4.1")."""
        return self.window_blocks + (self.variant == "minicpm4.1")

    @property
    def topk_slots(self) -> int:
        """Top-k picks outside the local band, init blocks included: topk ("minicpm4") or topk - 1 ("minicpm4.1":
        topk + n slots hold the n + 1 forced local blocks)."""
        return self.topk - (self.variant == "minicpm4.1")

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
        lse = d.get("lse_approx", d.get("use_lse_approx"))
        variant = d.get("variant")
        if variant is None:
            _say_default_variant()
            variant = DEFAULT_VARIANT
        extra = {k: v for k, v in d.items()
                 if k not in _HF_FIELDS and k not in ("lse_approx", "use_lse_approx", "variant")}
        return cls(**known, variant=variant, lse_approx=lse, extra=extra)

    def to_hf_dict(self) -> dict:
        """The HF dict, with `variant` and `lse_approx` always written so that a reload runs the same function."""
        out = {k: getattr(self, k) for k in _HF_FIELDS}
        out["variant"] = self.variant
        out["lse_approx"] = self.lse_approx
        out.update(self.extra)
        return out


def _say_default_variant() -> None:
    global _said_default
    if not _said_default:
        _said_default = True
        log.warning("sparse_config names no InfLLM v2 variant: using %r (the current official kernels). Set "
                    "sparse_config.variant to 'minicpm4' for the June-2025 semantics (window outside top-k, exact "
                    "softmax normaliser).", DEFAULT_VARIANT)
