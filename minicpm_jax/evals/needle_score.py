"""Scoring needle items: an answer is right when it names the needle's number and no distractor's number.

RULER's single-needle metric is "the reference string occurs in the prediction"; we add "and no other needle's
number does", so listing every number in the haystack does not score. Accuracy is reported overall, per length,
per depth and per (length, depth) cell (the heatmap).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence


def is_correct(item: dict, prediction: str) -> bool:
    """Whether `prediction` (the model's generated text) answers `item` (a `needles.build_items` item)."""
    text = prediction or ""
    return item["answer"] in text and not any(d["value"] in text for d in item.get("distractors", ()))


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def score(items: Sequence[dict], predictions: Sequence[str]) -> dict:
    """{"accuracy", "n", "by_length": {length: acc}, "by_depth": {depth: acc}, "grid": {length: {depth: acc}},
    "correct": [bool per item]}."""
    if len(items) != len(predictions):
        raise ValueError(f"needle scoring: {len(items)} items but {len(predictions)} predictions")
    correct = [is_correct(it, p) for it, p in zip(items, predictions)]
    by_len, by_depth, grid = defaultdict(list), defaultdict(list), defaultdict(lambda: defaultdict(list))
    for it, ok in zip(items, correct):
        by_len[it["length"]].append(float(ok))
        by_depth[it["depth"]].append(float(ok))
        grid[it["length"]][it["depth"]].append(float(ok))
    return {"accuracy": _mean([float(c) for c in correct]), "n": len(items),
            "by_length": {k: _mean(v) for k, v in sorted(by_len.items())},
            "by_depth": {k: _mean(v) for k, v in sorted(by_depth.items())},
            "grid": {n: {d: _mean(v) for d, v in sorted(row.items())} for n, row in sorted(grid.items())},
            "correct": correct}
