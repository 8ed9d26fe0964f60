"""Copy-task training records: a warm-up that forms induction heads (attend to what followed the earlier occurrence
of the current token, and copy it) before a model is taught needle retrieval.

One item = BOS, a span of `n` random token ids, `g` filler ids (the gap), the same span again, EOS:

    <BOS> a b c ... z  f f ... f  a b c ... z <EOS>
                                    ^^^^^^^^^^^^^^^  the loss mask: every token of the second copy but its first, and EOS

Without a gap the copy sits exactly `n` tokens back, so a model can learn to attend by relative position for the
span lengths it saw and never copy by content (measured: copying 4-24-token spans, failing at 16-48). A random gap
makes the distance unpredictable, so only a content match (an induction head) lowers the loss.

The first token of the second copy is not predictable (the model cannot know where the span ends), so it carries
no loss; every later one is predictable only by copying, and its loss falls from ln(|pool|) to ~0 once the model
copies. That is a dense, unambiguous signal: a needle item's answer is ~8 loss tokens in 1-2K, a copy item's is
about half its tokens. Ids are drawn uniformly from `pool` (the ids of the corpus's own training text, so no
special or unused id), from `random.Random("copy-train/<seed>/<index>")`; span lengths uniformly from
min_span..max_span. Nothing here comes from the eval's text or keys.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from data_pipeline import records
from data_pipeline.tokenizer import Tokenizer

SOURCE = "copy_train"


@dataclasses.dataclass(frozen=True)
class CopyTrainSpec:
    """items: how many; min_span..max_span: the copied span's length in tokens; min_gap..max_gap: filler tokens
    between the two copies (an item is 2 * span + gap + 2 tokens); seed: the item namespace."""

    items: int = 4000
    min_span: int = 8
    max_span: int = 64
    seed: int = 1
    min_gap: int = 0
    max_gap: int = 0

    def __post_init__(self):
        if self.items < 1:
            raise ValueError(f"CopyTrainSpec.items must be >= 1, got {self.items}")
        if not 2 <= self.min_span <= self.max_span:
            raise ValueError(f"CopyTrainSpec: 2 <= min_span <= max_span (got {self.min_span}, {self.max_span})")
        if not 0 <= self.min_gap <= self.max_gap:
            raise ValueError(f"CopyTrainSpec: 0 <= min_gap <= max_gap (got {self.min_gap}, {self.max_gap})")


def build_item(pool: Sequence[int], spec: CopyTrainSpec, index: int, bos_id: int, eos_id: int) -> dict:
    """One item: {"tokens": int32 [2n+g+2], "mask": uint8 [2n+g+2], "span": n, "gap": g, "id"}; mask is 1 on the
    second copy after its first token (tokens n+g+2..2n+g) and on the final EOS."""
    rng = random.Random(f"copy-train/{spec.seed}/{index}")
    n = rng.randint(spec.min_span, spec.max_span)
    span = [pool[rng.randrange(len(pool))] for _ in range(n)]
    g = rng.randint(spec.min_gap, spec.max_gap) if spec.max_gap else 0    # no draw: gap-free items stay as before
    gap = [pool[rng.randrange(len(pool))] for _ in range(g)]
    tokens = [bos_id] + span + gap + span + [eos_id]
    mask = [0] * (n + g + 2) + [1] * n              # BOS, first copy, gap, first token of the second: no loss
    return {"tokens": np.asarray(tokens, np.int32), "mask": np.asarray(mask, np.uint8), "span": n, "gap": g,
            "id": f"{SOURCE}/{spec.seed}/{index}"}


def text_pool(tok: Tokenizer, texts: Sequence[str], size: Optional[int] = None) -> list[int]:
    """The sorted distinct ids of `texts` under `tok` (ordinary pieces only: the ids the corpus itself uses); with
    `size`, only the `size` most frequent (ties: the smaller id). A small pool of frequent ids gives each id many
    copies per step, which shortens the plateau before the model starts to copy."""
    counts = Counter(i for ids in tok.encode_batch(list(texts)) for i in ids)
    if not counts:
        raise ValueError("copy-task pool: the texts encode to no token")
    if size is not None and size < 2:
        raise ValueError(f"copy-task pool: size must be >= 2, got {size}")
    ranked = sorted(counts, key=lambda i: (-counts[i], i))
    return sorted(ranked[:size] if size else ranked)


def write_records(out_dir: str | Path, tok: Tokenizer, spec: CopyTrainSpec, pool: Sequence[int]) -> dict:
    """Write `<out_dir>/tokens/train/copy_train-*.array_record` (token records with the loss mask) and
    `<out_dir>/summary.json`; returns the summary."""
    out_dir = Path(out_dir)
    items = [build_item(pool, spec, i, tok.bos_id, tok.eos_id) for i in range(spec.items)]
    recs = [records.encode_token_record(it["tokens"], mask=it["mask"], id=it["id"], source=SOURCE, lang="en",
                                        score=1.0) for it in items]
    shards = records.write_shards(recs, out_dir / "tokens" / "train", SOURCE)
    summary = {"items": len(items), "tokens": int(sum(len(it["tokens"]) for it in items)),
               "loss_tokens": int(sum(int(it["mask"].sum()) for it in items)), "pool": len(pool),
               "spec": dataclasses.asdict(spec), "shards": [str(s) for s in shards]}
    records.write_json(out_dir / "summary.json", summary)
    return summary
