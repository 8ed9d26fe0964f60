"""Bytes moved by the collectives of a compiled XLA program, read from its HLO text.

Used by the dry run (what a step sends between devices) and by the tests that hold the sparse path to the dense
path's communication. A collective counts the bytes of its result per device (an all-gather: the gathered tensor;
an all-reduce: the reduced one), times the number of times its computation runs: the body of a while loop with a
known trip count (the scan over layers, micro-batches) runs that many times per step. Ops whose replica groups all
have one member move nothing (shard_map's transpose emits such psums over mesh axes of size 1) and are not counted.
"""

from __future__ import annotations

import math
import re

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
_OP = re.compile(r"=\s*(?P<shape>.*?)\s+(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\(")
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_GROUPS = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")


def _moves_data(line: str) -> bool:
    m = _GROUPS.search(line)
    if m is None:   # iota-style groups ([2,4]<=[8]) or none: a real exchange
        return True
    return any(len(g.split(",")) > 1 for g in re.findall(r"\{([\d,]*)\}", m.group(1)))


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """{computation name: its instruction lines}, and the entry computation's name."""
    comps, entry, name = {}, "", None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            name = head.group(2)
            comps[name] = []
            if head.group(1):
                entry = name
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps, entry


def _runs_per_step(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per call of the entry (while bodies x their known trip count)."""
    runs = {entry: 1}
    stack = [entry]
    while stack:
        parent = stack.pop()
        for line in comps.get(parent, ()):
            trips = _TRIPS.search(line)
            callees = _CALLEE.findall(line)
            for group in _BRANCHES.findall(line):   # every branch counted as if it ran: an upper bound
                callees += [("branch", c.strip().lstrip("%")) for c in group.split(",")]
            for attr, callee in callees:
                factor = int(trips.group(1)) if (trips and attr == "body") else 1
                n = runs[parent] * factor
                if callee in comps and runs.get(callee, 0) < n:
                    runs[callee] = n
                    stack.append(callee)
    return runs


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """{kind: bytes per device per run of the module} over every collective (async starts counted once, their
    dones not), each times the runs of its computation."""
    out = {k: 0 for k in KINDS}
    comps, entry = _computations(hlo_text)
    runs = _runs_per_step(comps, entry) if entry else {}
    for comp, lines in (comps.items() if comps else [("", hlo_text.splitlines())]):
        for line in lines:
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
            size = sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in arrays)
            out[m.group("kind")] += size * runs.get(comp, 1)
    return out
