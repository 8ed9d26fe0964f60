"""Copy score (minicpm_jax.evals.copy_score): right-padding, and top-1 / loss on the masked targets against values
worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minicpm_jax.evals import copy_score


def test_batch_items_pads_right_and_leaves_the_eos_out():
    items = [{"tokens": [1, 5, 6, 5, 6, 2], "mask": [0, 0, 0, 0, 1, 1]}, {"tokens": [1, 7, 7, 2], "mask": [0, 0, 0, 1]}]
    ids, mask = copy_score.batch_items(items)
    assert ids.tolist() == [[1, 5, 6, 5, 6, 2], [1, 7, 7, 2, 0, 0]]
    assert mask.tolist() == [[0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0]]       # the copied 6 only; no EOS, no padding


def test_score_by_hand():
    tokens = np.array([[0, 1, 2]])
    mask = np.array([[0, 1, 1]])                 # targets: token 1 (from position 0) and token 2 (from position 1)
    logits = np.zeros((1, 3, 3))
    logits[0, 0, 1] = math.log(2.0)             # p(1) = 2/4 at position 0: right and top-1
    logits[0, 1, 0] = math.log(3.0)             # p(2) = 1/5 at position 1: wrong (token 0 is top-1)
    s = copy_score.score(logits, tokens, mask)
    assert s["targets"] == 2 and s["top1"] == 0.5
    assert s["loss"] == pytest.approx((math.log(2.0) + math.log(5.0)) / 2)
    with pytest.raises(ValueError, match="mask"):
        copy_score.score(logits, tokens, np.zeros_like(mask))
