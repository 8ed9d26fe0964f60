"""FR-Spec vocabulary: the draft head scores only the N most frequent token ids (MiniCPM4 §5.2, spec §5.2).

The ids are counted from the run's own training tokens; ids that must always be draftable (EOS, chat markers)
are forced in. The list is sorted by id so a draft row maps back to the full vocabulary with one gather.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def count_tokens(token_arrays: Iterable[np.ndarray], vocab_size: int) -> np.ndarray:
    """Occurrences of every id in 0..vocab_size-1 over the given token arrays -> int64 [vocab_size].

    Raises ValueError naming the first id outside the vocabulary."""
    counts = np.zeros(vocab_size, np.int64)
    for arr in token_arrays:
        arr = np.asarray(arr).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            bad = arr[(arr < 0) | (arr >= vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary of {vocab_size}")
        counts += np.bincount(arr, minlength=vocab_size)
    return counts


def frequent_ids(counts: np.ndarray, size: int, always: Sequence[int] = ()) -> np.ndarray:
    """The FR-Spec id list: `always` plus the most frequent other ids (ties to the lower id), int32 [size], sorted.

    counts: [V] occurrences. size: N, 1 <= N <= V and >= len(set(always))."""
    counts = np.asarray(counts)
    v = counts.shape[0]
    forced = sorted({int(i) for i in always})
    if any(not 0 <= i < v for i in forced):
        raise ValueError(f"FR-Spec: forced ids {forced} must lie in [0, {v})")
    if not len(forced) <= size <= v:
        raise ValueError(f"FR-Spec size must be in [{len(forced)}, {v}] (forced ids: {len(forced)}), got {size}")
    order = np.lexsort((np.arange(v), -counts))           # by count descending, then id ascending
    rest = [int(i) for i in order if i not in set(forced)][:size - len(forced)]
    return np.array(sorted(forced + rest), np.int32)
