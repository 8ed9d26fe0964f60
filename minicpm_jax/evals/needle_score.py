"""Scoring needle items: an answer is right when it names the needle's number and no distractor's number.

RULER's single-needle metric is "the reference string occurs in the prediction"; we add "and no other needle's
number does", so listing every number in the haystack does not score. Accuracy is reported overall, per length,
per depth and per (length, depth) cell (the heatmap). Two partial-credit diagnostics say how a wrong answer is
wrong, from the prediction's first run of digits against the answer: `leading_digits`, how many of the answer's
digits it gets right before the first slip (finding the needle's start), and `digits_in_place`, the fraction of
the answer's positions holding the right digit (copying the number, perhaps from a wrong start); chance is 0.1.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence


def is_correct(item: dict, prediction: str) -> bool:
    """Whether `prediction` (the model's generated text) answers `item` (a `needles.build_items` item)."""
    text = prediction or ""
    return item["answer"] in text and not any(d["value"] in text for d in item.get("distractors", ()))


def digit_match(answer: str, prediction: str) -> tuple[int, float]:
    """(leading digits right, fraction of positions right) of `prediction`'s first run of digits against the
    digit string `answer`: ("2181950", " 1891950.") -> (0, 4/7)."""
    run = re.search(r"\d+", prediction or "")
    digits = run.group() if run else ""
    lead = 0
    while lead < min(len(answer), len(digits)) and answer[lead] == digits[lead]:
        lead += 1
    return lead, sum(a == b for a, b in zip(answer, digits)) / len(answer)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def score(items: Sequence[dict], predictions: Sequence[str]) -> dict:
    """{"accuracy", "n", "by_length": {length: acc}, "by_depth": {depth: acc}, "grid": {length: {depth: acc}},
    "leading_digits", "digits_in_place" (means over items; see the module doc), "digits_by_length": {length:
    {"leading_digits", "digits_in_place"}}, "correct": [bool per item]}."""
    if len(items) != len(predictions):
        raise ValueError(f"needle scoring: {len(items)} items but {len(predictions)} predictions")
    correct = [is_correct(it, p) for it, p in zip(items, predictions)]
    match = [digit_match(it["answer"], p) for it, p in zip(items, predictions)]
    by_len, by_depth, grid = defaultdict(list), defaultdict(list), defaultdict(lambda: defaultdict(list))
    by_len_match = defaultdict(list)
    for it, ok, m in zip(items, correct, match):
        by_len_match[it["length"]].append(m)
        by_len[it["length"]].append(float(ok))
        by_depth[it["depth"]].append(float(ok))
        grid[it["length"]][it["depth"]].append(float(ok))
    return {"accuracy": _mean([float(c) for c in correct]), "n": len(items),
            "by_length": {k: _mean(v) for k, v in sorted(by_len.items())},
            "by_depth": {k: _mean(v) for k, v in sorted(by_depth.items())},
            "grid": {n: {d: _mean(v) for d, v in sorted(row.items())} for n, row in sorted(grid.items())},
            "leading_digits": _mean([m[0] for m in match]), "digits_in_place": _mean([m[1] for m in match]),
            "digits_by_length": {n: {"leading_digits": _mean([m[0] for m in v]),
                                     "digits_in_place": _mean([m[1] for m in v])}
                                 for n, v in sorted(by_len_match.items())},
            "correct": correct}
