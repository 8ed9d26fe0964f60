"""Packing tokenized documents into fixed-length rows with grain, and the training batch format.

A document longer than seq_len is first cut into pieces of at most seq_len tokens (`ChunkDocument`); then grain's
`FirstFitPackIterDataset` places whole pieces into rows, padding the rest: no piece crosses a row boundary, every
token appears exactly once, in order, and positions restart at 0 for each piece. (grain's first-fit packer
requires inputs no longer than the row, hence the chunking step; concat-then-split would cut documents at row
ends instead.)

Batch format (`ToBatch`), each int32 [batch, seq_len]:
  input_ids   token ids, pad_id at padding
  segment_ids 1, 2, ... for the pieces of a row, 0 at padding
  positions   position within the piece, 0 at padding
  loss_mask   1 where the token is a target: every real token for pretraining, assistant tokens for SFT
"""

from __future__ import annotations

import grain
import numpy as np

class ChunkDocument(grain.experimental.FlatMapTransform):
    """{"tokens", "loss_mask"} -> pieces of at most seq_len tokens (the last may be shorter); empty docs vanish."""

    max_fan_out = 1 << 20  # only used by the MapDataset flavour; pieces are produced lazily by the iterator

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, element):
        t, m = element["tokens"], element["loss_mask"]
        return [{"tokens": t[i:i + self.seq_len], "loss_mask": m[i:i + self.seq_len]}
                for i in range(0, len(t), self.seq_len)]


def pack(ds: grain.IterDataset, seq_len: int, *, num_bins: int, seed: int, shuffle_bins: bool,
         one_per_row: bool = False) -> grain.IterDataset:
    """Chunk then first-fit pack; yields rows {tokens, tokens_segment_ids, tokens_positions, loss_mask}.

    one_per_row: each row holds a single document piece (plus padding), as sparse attention needs.
    """
    ds = grain.experimental.FlatMapIterDataset(ds, ChunkDocument(seq_len))
    return grain.experimental.FirstFitPackIterDataset(
        ds, length_struct={"tokens": seq_len, "loss_mask": seq_len}, num_packing_bins=num_bins, seed=seed,
        shuffle_bins=shuffle_bins, meta_features=("loss_mask",), max_sequences_per_bin=1 if one_per_row else None)


class ToBatch(grain.transforms.Map):
    """Packed rows (batched) -> the training batch dict; pads a short final batch with empty rows."""

    def __init__(self, batch_size: int, pad_id: int = 0):
        self.batch_size = batch_size
        self.pad_id = pad_id

    def map(self, rows):
        seg = np.asarray(rows["tokens_segment_ids"], np.int32)
        real = seg > 0
        ids = np.where(real, rows["tokens"], self.pad_id).astype(np.int32)
        out = {"input_ids": ids, "segment_ids": seg,
               "positions": np.where(real, rows["tokens_positions"], 0).astype(np.int32),
               "loss_mask": (np.asarray(rows["loss_mask"]) * real).astype(np.int32)}
        short = self.batch_size - seg.shape[0]
        if short > 0:
            for k, v in out.items():
                fill = self.pad_id if k == "input_ids" else 0
                out[k] = np.concatenate([v, np.full((short, v.shape[1]), fill, np.int32)])
        return out


def unpack_rows(batch: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """The document pieces of a batch as (tokens, loss_mask) pairs, row by row in segment order (for tests/tools)."""
    pieces = []
    for r in range(batch["segment_ids"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in range(1, int(seg.max(initial=0)) + 1):
            m = seg == s
            pieces.append((batch["input_ids"][r][m], batch["loss_mask"][r][m]))
    return pieces
