"""Model configuration: one frozen dataclass whose field names are the Hugging Face MiniCPM names.

`ModelConfig.from_hf_dict(json.load(open("config.json")))` maps a MiniCPM checkpoint's config one to one; keys the
model does not use are kept in `extra` and written back by `to_hf_dict`, so a config round-trips. Fields absent from
a config.json take the defaults of HF's `MiniCPMConfig`, as transformers would. Run-time choices that are not part of
the checkpoint (compute dtype, scan, remat, sparse kernel implementation) are separate fields that `to_hf_dict` skips.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence, Union

from minicpm_jax.sparse.config import SparseConfig

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "attn_out")
SPARSE_IMPLS = ("reference", "xla", "pallas")
WEIGHT_QUANTS = ("none", "ternary")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` of a MiniCPM config. MiniCPM4 ships `rope_type: "longrope"` with per-frequency factors.

    short_factor / long_factor: head_dim/2 divisors of the rotary frequencies; long is used when the cached length
    exceeds `original_max_position_embeddings` (HF `MiniCPMLongRoPE`).
    """

    rope_type: str
    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    type_key: str = "rope_type"  # which key named the type in the source dict ("type" in older configs)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=True)

    @classmethod
    def from_hf_dict(cls, d: Any, head_dim: int, max_position_embeddings: int) -> "RopeScaling":
        if not isinstance(d, Mapping):
            raise ValueError(f"rope_scaling must be a dict or null, got {type(d).__name__}: {d!r}")
        type_key = "rope_type" if "rope_type" in d else "type"
        rope_type = d.get(type_key)
        if rope_type not in ("longrope", "su"):
            raise ValueError(
                f"rope_scaling.{type_key} = {rope_type!r} is not supported: MiniCPM uses 'longrope' "
                "(per-frequency short/long factors); set rope_scaling to null for plain RoPE")
        half = head_dim // 2
        factors = {}
        for key in ("short_factor", "long_factor"):
            f = d.get(key)
            if not isinstance(f, Sequence) or isinstance(f, str):
                raise ValueError(f"rope_scaling.{key} must be a list of {half} numbers (head_dim/2), got {f!r}")
            if len(f) != half:
                raise ValueError(f"rope_scaling.{key} has {len(f)} entries, expected head_dim/2 = {half}")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in f):
                raise ValueError(f"rope_scaling.{key} must hold positive numbers, got {list(f)!r}")
            factors[key] = tuple(float(x) for x in f)
        orig = d.get("original_max_position_embeddings", max_position_embeddings)
        if not isinstance(orig, int) or isinstance(orig, bool) or orig <= 1:
            raise ValueError(f"rope_scaling.original_max_position_embeddings must be an int > 1, got {orig!r}")
        known = {type_key, "short_factor", "long_factor", "original_max_position_embeddings"}
        extra = {k: v for k, v in d.items() if k not in known}
        return cls(rope_type=rope_type, original_max_position_embeddings=orig, type_key=type_key, extra=extra,
                   **factors)

    def to_hf_dict(self) -> dict:
        out = {self.type_key: self.rope_type, "short_factor": list(self.short_factor),
               "long_factor": list(self.long_factor),
               "original_max_position_embeddings": self.original_max_position_embeddings}
        out.update(self.extra)
        return out


# HF field name -> default in transformers' MiniCPMConfig (what a config.json that omits the key means).
_HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
    rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    rope_theta=10000.0, rope_scaling=None, attention_bias=False, scale_emb=1.0, dim_model_base=1.0,
    scale_depth=1.0, sparse_config=None,
)
_RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat_policy", "sparse_impl", "attention_chunk_size",
                   "weight_quant", "quant_group_size")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """MiniCPM4 architecture (HF names) plus run-time choices. Frozen and hashable: usable as a jit static arg.

    The three μP scalars enter the forward pass as: embeddings × `scale_emb`; each residual branch ×
    `scale_depth / sqrt(num_hidden_layers)`; final hidden ÷ (`hidden_size / dim_model_base`) before the head.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Union[int, tuple[int, ...], None] = 2
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    attention_bias: bool = False
    scale_emb: float = 1.0
    dim_model_base: float = 1.0
    scale_depth: float = 1.0
    sparse_config: Optional[SparseConfig] = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False, compare=True)
    # --- run-time choices (not written to config.json) ---
    dtype: str = "float32"          # activation / matmul compute dtype
    param_dtype: str = "float32"    # parameter storage dtype (fp32 master weights with bf16 compute is the usual)
    scan_layers: bool = True        # nn.scan over layers (fast compile); False unrolls the same stacked params
    remat_policy: str = "none"      # activation checkpointing per layer, see REMAT_POLICIES
    sparse_impl: str = "xla"        # InfLLM v2 implementation used by the model's sparse path
    attention_chunk_size: int = 2048  # dense attention is evaluated in query chunks of this size (memory bound)
    weight_quant: str = "none"      # "ternary": BitCPM-style QAT of attention/MLP matrices (see quant.py)
    quant_group_size: int = -1      # ternary scale group along the input dim; -1 = one scale per output channel

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        def need(cond: bool, field: str, msg: str):
            if not cond:
                raise ValueError(f"ModelConfig.{field}: {msg}")

        def pos_int(field: str):
            v = getattr(self, field)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, field, f"must be a positive int, got {v!r}")

        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "attention_chunk_size"):
            pos_int(f)
        need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
             f"{self.num_attention_heads} heads do not divide hidden_size {self.hidden_size}")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"{self.num_key_value_heads} KV heads do not divide num_attention_heads {self.num_attention_heads}")
        need(self.head_dim % 2 == 0, "hidden_size", f"head_dim {self.head_dim} must be even for rotary embeddings")
        need(self.hidden_act == "silu", "hidden_act", f"MiniCPM uses 'silu' (SwiGLU), got {self.hidden_act!r}")
        need(self.attention_bias is False, "attention_bias", "MiniCPM4 attention has no biases")
        for f in ("rms_norm_eps", "rope_theta", "scale_emb", "dim_model_base", "scale_depth", "initializer_range"):
            v = getattr(self, f)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, f, f"must be a positive number, got {v!r}")
        need(self.rope_scaling is None or isinstance(self.rope_scaling, RopeScaling), "rope_scaling",
             "must be a RopeScaling (use ModelConfig.from_hf_dict for a dict)")
        if self.rope_scaling is not None:
            half = self.head_dim // 2
            for key in ("short_factor", "long_factor"):
                n = len(getattr(self.rope_scaling, key))
                need(n == half, "rope_scaling", f"{key} has {n} entries, expected head_dim/2 = {half}")
        need(self.sparse_config is None or isinstance(self.sparse_config, SparseConfig), "sparse_config",
             "must be a SparseConfig or None")
        eos = self.eos_token_id
        need(eos is None or isinstance(eos, int) or (isinstance(eos, tuple) and all(isinstance(e, int) for e in eos)),
             "eos_token_id", f"must be an int or a list of ints, got {eos!r}")
        for f in ("bos_token_id", "pad_token_id"):
            v = getattr(self, f)
            need(v is None or (isinstance(v, int) and 0 <= v < self.vocab_size), f,
                 f"must be a token id in [0, vocab_size={self.vocab_size}), got {v!r}")
        for e in self.eos_ids:
            need(0 <= e < self.vocab_size, "eos_token_id", f"id {e} is outside [0, vocab_size={self.vocab_size})")
        need(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        need(self.param_dtype in DTYPES, "param_dtype", f"must be one of {DTYPES}, got {self.param_dtype!r}")
        need(self.remat_policy in REMAT_POLICIES, "remat_policy",
             f"must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        need(self.sparse_impl in SPARSE_IMPLS, "sparse_impl", f"must be one of {SPARSE_IMPLS}, got {self.sparse_impl!r}")
        need(self.weight_quant in WEIGHT_QUANTS, "weight_quant",
             f"must be one of {WEIGHT_QUANTS}, got {self.weight_quant!r}")
        need(self.quant_group_size == -1 or (isinstance(self.quant_group_size, int) and self.quant_group_size > 0),
             "quant_group_size", f"must be -1 (per output channel) or a positive int, got {self.quant_group_size!r}")

    # ------------------------------------------------------------------ derived quantities
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def residual_scale(self) -> float:
        """Branch multiplier before each residual add: scale_depth / sqrt(L)."""
        return self.scale_depth / math.sqrt(self.num_hidden_layers)

    @property
    def width_mult(self) -> float:
        """μP width multiplier hidden_size / dim_model_base; the final hidden state is divided by it."""
        return self.hidden_size / self.dim_model_base

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        return () if e is None else ((e,) if isinstance(e, int) else tuple(e))

    def replace(self, **changes) -> "ModelConfig":
        """A copy with fields changed (validated). `rope_scaling` / `sparse_config` may be given as HF dicts; a
        sparse_config dict changes only the keys it names (`model.sparse_config.topk=4` keeps the preset's blocks);
        one that names `variant` but not `lse_approx` gives lse_approx the new variant's default."""
        if isinstance(changes.get("sparse_config"), Mapping):
            base = self.sparse_config.to_hf_dict() if self.sparse_config is not None else {}
            new = changes["sparse_config"]
            if "variant" in new and "lse_approx" not in new:
                base.pop("lse_approx", None)
            changes["sparse_config"] = SparseConfig.from_hf_dict({**base, **new})
        if isinstance(changes.get("rope_scaling"), Mapping):
            hidden = changes.get("hidden_size", self.hidden_size)
            heads = changes.get("num_attention_heads", self.num_attention_heads)
            changes["rope_scaling"] = RopeScaling.from_hf_dict(
                changes["rope_scaling"], hidden // heads, changes.get("max_position_embeddings",
                                                                      self.max_position_embeddings))
        if isinstance(changes.get("eos_token_id"), list):
            changes["eos_token_id"] = tuple(changes["eos_token_id"])
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def param_count(self) -> int:
        """Number of parameters (the tied head counted once)."""
        h, f, v, l = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        kv = self.num_key_value_heads * self.head_dim
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
        return v * h * (1 if self.tie_word_embeddings else 2) + l * per_layer + h

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **runtime) -> "ModelConfig":
        """Build from a MiniCPM `config.json` dict. Unknown keys are kept in `extra`; `runtime` sets run-time fields."""
        if not isinstance(d, Mapping):
            raise ValueError(f"config.json must hold a JSON object, got {type(d).__name__}")
        vals = {k: d.get(k, default) for k, default in _HF_DEFAULTS.items()}
        if vals["num_key_value_heads"] is None:
            vals["num_key_value_heads"] = vals["num_attention_heads"]
        for k in ("hidden_size", "num_attention_heads"):
            if not isinstance(vals[k], int) or isinstance(vals[k], bool) or vals[k] <= 0:
                raise ValueError(f"ModelConfig.{k}: must be a positive int, got {vals[k]!r}")
        if vals["hidden_size"] % vals["num_attention_heads"]:
            raise ValueError(f"ModelConfig.num_attention_heads: {vals['num_attention_heads']} heads do not divide "
                             f"hidden_size {vals['hidden_size']}")
        head_dim = vals["hidden_size"] // vals["num_attention_heads"]
        if "head_dim" in d and d["head_dim"] not in (None, head_dim):
            raise ValueError(f"ModelConfig.head_dim: config.json says {d['head_dim']}, but MiniCPM derives "
                             f"hidden_size/num_attention_heads = {head_dim}")
        if vals["rope_scaling"] is not None:
            vals["rope_scaling"] = RopeScaling.from_hf_dict(vals["rope_scaling"], head_dim,
                                                            vals["max_position_embeddings"])
        if vals["sparse_config"] is not None:
            vals["sparse_config"] = SparseConfig.from_hf_dict(vals["sparse_config"])
        if isinstance(vals["eos_token_id"], list):
            vals["eos_token_id"] = tuple(vals["eos_token_id"])
        for k in ("rope_theta", "scale_emb", "dim_model_base", "scale_depth", "initializer_range", "rms_norm_eps"):
            if isinstance(vals[k], int) and not isinstance(vals[k], bool):
                vals[k] = float(vals[k])
        if d.get("model_type", "minicpm") != "minicpm":
            raise ValueError(f"ModelConfig.model_type: {d['model_type']!r} is not a MiniCPM (model_type 'minicpm') "
                             "config; MiniCPM3 ('minicpm3') is a different, MLA architecture")
        derived = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "head_dim": head_dim}
        extra = {k: v for k, v in d.items() if k not in _HF_DEFAULTS and derived.get(k, object()) != v}
        return cls(**vals, extra=extra, **runtime)

    def to_hf_dict(self) -> dict:
        """The `config.json` dict (MiniCPM's published format), unknown keys from the source restored."""
        out: dict[str, Any] = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm"}
        for k in _HF_DEFAULTS:
            v = getattr(self, k)
            if k == "rope_scaling":
                v = None if v is None else v.to_hf_dict()
            elif k == "sparse_config":
                v = None if v is None else v.to_hf_dict()
            elif k == "eos_token_id" and isinstance(v, tuple):
                v = list(v)
            out[k] = v
        out["head_dim"] = self.head_dim
        out.update(self.extra)
        return out

    def runtime_dict(self) -> dict:
        return {k: getattr(self, k) for k in _RUNTIME_FIELDS}

    # ------------------------------------------------------------------ presets
    @classmethod
    def tiny(cls, **overrides) -> "ModelConfig":
        """A ~6M-parameter MiniCPM4 that trains on 2 CPU cores: the μP base width (hidden = dim_model_base = 256).

        Its sparse_config is InfLLM v2 scaled down 4x (blocks of 16 tokens) so the sparse path runs at CPU lengths.
        """
        base = cls(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                   initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                   tie_word_embeddings=True, rope_theta=10000.0, scale_emb=12.0, dim_model_base=256.0,
                   scale_depth=1.4,
                   sparse_config=SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1,
                                              window_size=128, topk=8, dense_len=1024))
        return base.replace(**overrides) if overrides else base

    @classmethod
    def minicpm4_0_5b(cls, **overrides) -> "ModelConfig":
        """MiniCPM4-0.5B shapes (spec §1.1). Tied head; no sparse_config (the 0.5B was not released for sparse use).

        initializer_range, rope_scaling and max_position_embeddings are UNCONFIRMED for the released model: an
        imported checkpoint's own config.json always wins (load_hf reads it).
        """
        base = cls(vocab_size=73448, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                   num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                   initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=(2, 73440),
                   tie_word_embeddings=True, rope_theta=10000.0, scale_emb=12.0, dim_model_base=256.0,
                   scale_depth=1.4)
        return base.replace(**overrides) if overrides else base

    @classmethod
    def minicpm4_8b(cls, **overrides) -> "ModelConfig":
        """MiniCPM4-8B shapes (spec §1.1): untied head, InfLLM v2 sparse_config as published.

        No rope_scaling: the factor list inside the released config.json is UNCONFIRMED (spec §1.4). A phase started
        from a checkpoint (`train.init_from`) takes the checkpoint's own; `long_context_sparse.yaml` sets the published
        128K LongRoPE list explicitly.
        """
        base = cls(vocab_size=73448, hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=2, max_position_embeddings=32768,
                   initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=(2, 73440),
                   tie_word_embeddings=False, rope_theta=10000.0, scale_emb=12.0, dim_model_base=256.0,
                   scale_depth=1.4, sparse_config=SparseConfig())
        return base.replace(**overrides) if overrides else base

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        presets = {"tiny": cls.tiny, "minicpm4_0_5b": cls.minicpm4_0_5b, "minicpm4_8b": cls.minicpm4_8b,
                   "0.5b": cls.minicpm4_0_5b, "8b": cls.minicpm4_8b}
        if name not in presets:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(presets)}")
        return presets[name](**overrides)
