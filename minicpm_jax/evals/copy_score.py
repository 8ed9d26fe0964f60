"""Copy-task score: how well a model copies the second half of held-out copy items (`data_pipeline.copy_train`),
the stage-1 measure of the retrieval curriculum. A model that does not copy scores top-1 ~ 1 / |pool| and a loss
near ln |pool| (it can only learn which ids the pool holds); one that copies scores top-1 near 1 and loss near 0."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def batch_items(items: Sequence[dict], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Items {"tokens", "mask"} -> (tokens int32 [B, T], mask int32 [B, T]), right-padded to the longest. The mask
    keeps the copied ids only: an item's last token (its EOS, in the training mask so the model learns to stop)
    needs no copying, and a model that predicts it would otherwise score top-1 ~ 1/span without copying."""
    t = max(len(it["tokens"]) for it in items)
    ids = np.full((len(items), t), pad_id, np.int32)
    mask = np.zeros((len(items), t), np.int32)
    for r, it in enumerate(items):
        ids[r, :len(it["tokens"])] = it["tokens"]
        mask[r, :len(it["mask"]) - 1] = it["mask"][:-1]
    return ids, mask


def score(logits: np.ndarray, tokens: np.ndarray, mask: np.ndarray) -> dict:
    """logits float [B, T, V] from `tokens` int [B, T]; mask int [B, T] (1 = a target token). Position t predicts
    t + 1. Returns {"top1", "loss" (mean -log p over the targets), "targets"}."""
    logits = np.asarray(logits, np.float64)[:, :-1]
    tgt, m = np.asarray(tokens)[:, 1:], np.asarray(mask)[:, 1:].astype(bool)
    if not m.any():
        raise ValueError("copy score: the mask selects no target token")
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    return {"top1": float((logits.argmax(-1) == tgt)[m].mean()), "loss": float(nll[m].mean()), "targets": int(m.sum())}
