"""Scoring needle items: an answer is right when it names the needle's number and no distractor's number.

RULER's single-needle metric is "the reference string occurs in the prediction"; we add "and no other needle's
number does", so listing every number in the haystack does not score. Items that ask for several numbers
(multi-value, multi-query: `answers`) score RULER's `string_match_all`, the fraction of the asked numbers that occur
in the prediction (0 if it names a distractor's number, as above; the variants as built have none). Accuracy is the
mean of these per-item scores (0/1 for one number asked), reported overall, per length, per depth and per (length,
depth) cell (the heatmap).

Two partial-credit diagnostics say how a wrong answer is wrong, from the prediction's first run of digits against
the answer: `leading_digits`, how many of the answer's digits it gets right before the first slip (finding the
needle's start), and `digits_in_place`, the fraction of the answer's positions holding the right digit (copying the
number, perhaps from a wrong start); chance is 0.1. They are computed over the items that ask for one number only:
with several, the first run of digits may rightly be any of them (the order of the answer is free), so comparing it
with one of them would call a right number a slip. A report with no such item has neither the two means nor
`digits_by_length`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence


def answers(item: dict) -> list[str]:
    """The numbers `item` asks for: its `answers` (several asked), else its one `answer`."""
    return list(item.get("answers") or [item["answer"]])


def item_score(item: dict, prediction: str) -> float:
    """The fraction of `item`'s asked numbers that `prediction` (the model's generated text) names, 0 if it names a
    distractor's number: 0 or 1 for one number asked."""
    text = prediction or ""
    if any(d["value"] in text for d in item.get("distractors", ())):
        return 0.0
    want = answers(item)
    return sum(a in text for a in want) / len(want)


def is_correct(item: dict, prediction: str) -> bool:
    """Whether `prediction` answers `item` (a `needles.build_items` item) fully: every asked number, no
    distractor's."""
    return item_score(item, prediction) == 1.0


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
    """{"accuracy", "n", "by_length": {length: acc}, "by_depth": {depth: acc}, "grid": {length: {depth: acc}} (acc:
    the mean item score), "leading_digits", "digits_in_place" (means over the one-number items; see the module
    doc), "digits_by_length": {length: {"leading_digits", "digits_in_place"}}, "correct": [bool per item: fully
    right], "scores": [float per item: `item_score`]}."""
    if len(items) != len(predictions):
        raise ValueError(f"needle scoring: {len(items)} items but {len(predictions)} predictions")
    scores = [item_score(it, p) for it, p in zip(items, predictions)]
    match = [digit_match(it["answer"], p) if len(answers(it)) == 1 else None for it, p in zip(items, predictions)]
    by_len, by_depth, grid = defaultdict(list), defaultdict(list), defaultdict(lambda: defaultdict(list))
    by_len_match = defaultdict(list)
    for it, sc, m in zip(items, scores, match):
        if m is not None:
            by_len_match[it["length"]].append(m)
        by_len[it["length"]].append(sc)
        by_depth[it["depth"]].append(sc)
        grid[it["length"]][it["depth"]].append(sc)
    out = {"accuracy": _mean(scores), "n": len(items),
           "by_length": {k: _mean(v) for k, v in sorted(by_len.items())},
           "by_depth": {k: _mean(v) for k, v in sorted(by_depth.items())},
           "grid": {n: {d: _mean(v) for d, v in sorted(row.items())} for n, row in sorted(grid.items())}}
    matched = [m for m in match if m is not None]
    if matched:
        out.update({"leading_digits": _mean([m[0] for m in matched]),
                    "digits_in_place": _mean([m[1] for m in matched]),
                    "digits_by_length": {n: {"leading_digits": _mean([m[0] for m in v]),
                                             "digits_in_place": _mean([m[1] for m in v])}
                                         for n, v in sorted(by_len_match.items())}})
    return {**out, "correct": [sc == 1.0 for sc in scores], "scores": scores}
