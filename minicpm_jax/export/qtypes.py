"""Which GGML type each tensor gets for an export `--qtype`, and the per-tensor fallbacks.

Policy (edge-export.md §4):

| qtype  | attention / MLP matrices | token_embd / output | 1-D (norms, rope factors) |
|--------|--------------------------|---------------------|---------------------------|
| f32    | F32                      | F32                 | F32                       |
| f16    | F16                      | F16                 | F32                       |
| bf16   | BF16                     | BF16                | F32                       |
| q8_0   | Q8_0                     | Q8_0                | F32                       |
| q4_0   | Q4_0                     | Q8_0                | F32                       |
| tq1_0  | TQ1_0                    | F16                 | F32                       |
| tq2_0  | TQ2_0                    | F16                 | F32                       |

Embeddings and head stay at 8 bits or more: the head (the tied embedding) sets every logit, and ternarising a
random-normal embedding alone moved logits by 4.8 (edge-export.md §4). llama.cpp's own q4_0 recipe uses Q6_K for the
head, which gguf-py cannot write; Q8_0 is the nearest type it can.

Fallbacks, per tensor, logged by the writer: a block type needs the row length (= the matrix's input dim) to be a
multiple of its block (32 for Q8_0/Q4_0, 256 for TQ). TQ falls back to Q8_0 (or F16 when the row is not a multiple of
32 either); Q8_0/Q4_0 fall back to F16. For a ternary-QAT model TQ is lossless only when one scale covers each
256-block of a row (per-channel scales, or groups that are multiples of 256); otherwise TQ also falls back to Q8_0,
which stores ternary values exactly whenever a scale covers each 32-block (and to F16 below that).
`q4_k_m` is not written here: it is made by llama.cpp's own quantizer from an F32 export (see `gguf.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType

QTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "tq1_0", "tq2_0")
LLAMACPP_QTYPES = ("q4_k_m",)          # made by llama.cpp's quantizer from an F32 file
ALL_QTYPES = QTYPES + LLAMACPP_QTYPES

_MATRIX = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "tq1_0": T.TQ1_0,
           "tq2_0": T.TQ2_0}
_EMBED = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q8_0, "tq1_0": T.F16,
          "tq2_0": T.F16}
FILE_TYPE = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
             "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0,
             "tq1_0": LlamaFileType.MOSTLY_TQ1_0, "tq2_0": LlamaFileType.MOSTLY_TQ2_0,
             "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M}
TERNARY_TYPES = (T.TQ1_0, T.TQ2_0)


def check_qtype(qtype: str) -> str:
    if qtype not in ALL_QTYPES:
        raise ValueError(f"unknown GGUF qtype {qtype!r}; choose one of {', '.join(ALL_QTYPES)}")
    return qtype


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


@dataclasses.dataclass(frozen=True)
class TypeChoice:
    """The GGML type of one tensor, and why it differs from the qtype's default (None when it does not)."""

    ggml_type: T
    fallback_reason: Optional[str] = None


def choose_type(qtype: str, kind: str, shape: tuple[int, ...], ternary_group: Optional[int] = None) -> TypeChoice:
    """GGML type for one tensor.

    Args:
      qtype: one of QTYPES.
      kind: "matrix" (attention / MLP weight), "embed" (token_embd / output) or "vector" (1-D).
      shape: numpy shape, HF layout [out, in] for matrices (ggml's row length is the last dim).
      ternary_group: for a ternary-QAT model, its scale group along the input dim (-1 = per output channel); None
        for a full-precision model.
    """
    if kind == "vector" or len(shape) == 1:
        return TypeChoice(T.F32)
    want = (_EMBED if kind == "embed" else _MATRIX)[qtype]
    row = shape[-1]

    def fits(t: T) -> bool:
        return row % block_size(t) == 0

    def fallback_8bit(reason: str) -> TypeChoice:
        # Q8_0 reproduces s·{-1,0,1} exactly when one scale covers each 32-block: max|x| = s -> code ±127.
        group_ok = ternary_group is None or ternary_group == -1 or ternary_group % block_size(T.Q8_0) == 0
        if fits(T.Q8_0) and group_ok:
            return TypeChoice(T.Q8_0, reason + "; using Q8_0")
        return TypeChoice(T.F16, reason + "; using F16")

    if want in TERNARY_TYPES:
        if not fits(want):
            return fallback_8bit(f"row length {row} is not a multiple of {block_size(want)} ({want.name} block)")
        if ternary_group is not None and ternary_group != -1 and ternary_group % block_size(want):
            return fallback_8bit(f"ternary scale group {ternary_group} is not a multiple of {block_size(want)}, "
                                 f"so {want.name} (one scale per {block_size(want)} weights) would be lossy")
        return TypeChoice(want)
    if not fits(want):
        return TypeChoice(T.F16, f"row length {row} is not a multiple of {block_size(want)} ({want.name} block); "
                                 "using F16")
    return TypeChoice(want)
