"""Bytes moved by the collectives of a compiled XLA program, read from its HLO text.

Used by the dry run (what a step sends between devices) and by the tests that hold the sparse path to the dense
path's communication. A collective counts the bytes of its result per device (an all-gather: the gathered tensor;
an all-reduce: the reduced one). Ops whose replica groups all have one member move nothing (shard_map's transpose
emits such psums over mesh axes of size 1) and are not counted.
"""

from __future__ import annotations

import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
_OP = re.compile(r"=\s*(?P<shape>.*?)\s+(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_GROUPS = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")


def _moves_data(line: str) -> bool:
    m = _GROUPS.search(line)
    if m is None:   # iota-style groups ([2,4]<=[8]) or none: a real exchange
        return True
    return any(len(g.split(",")) > 1 for g in re.findall(r"\{([\d,]*)\}", m.group(1)))


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """{kind: bytes per device} over every collective of the module (async starts counted once, their dones not)."""
    out = {k: 0 for k in KINDS}
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if m is None or not _moves_data(line):
            continue
        shape = m.group("shape")
        if m.group("kind") + "-start(" in line and shape.startswith("("):
            # an async start returns (operands, results[, scratch]): count the results only
            arrays = _ARRAY.findall(shape)
            arrays = arrays[len(arrays) // 2:]
        else:
            arrays = _ARRAY.findall(shape)
        out[m.group("kind")] += sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in arrays)
    return out
