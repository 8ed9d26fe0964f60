"""Copy-task training records: a warm-up that forms induction heads (attend to what followed the earlier occurrence
of the current token, and copy it) before a model is taught needle retrieval.

One item = BOS, a span of `n` random token ids, `g` filler ids (the gap), the same span again, EOS:

    <BOS> a b c ... z  f f ... f  a b c ... z <EOS>
                                    ^^^^^^^^^^^^^^^  the loss mask: every token of the second copy but its first, and EOS

Without a gap the copy sits exactly `n` tokens back, so a model can learn to attend by relative position for the
span lengths it saw and never copy by content (measured: copying 4-24-token spans, failing at 16-48). A random gap
makes the distance unpredictable, so only a content match (an induction head) lowers the loss. Filler of random
ids (`filler="ids"`) is not enough on its own: a model trained only on it copies across 256-480 random ids (top-1
0.92) yet not across 16-48 tokens of prose (0.04, measured), the setting of a needle. `filler="text"` takes the gap
from running corpus text instead (a window of the training text's ids at a random offset). A first copy that
always follows the BOS is a shortcut too: a model trained so copies 0.69 across 16-480 tokens of prose, but 0.05
once prose precedes the first copy as well (measured). So `min_lead..max_lead` filler tokens (of the same kind)
go before it:

    <BOS> l l ... l  a b c ... z  f f ... f  a b c ... z <EOS>

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
FILLERS = ("ids", "text")


@dataclasses.dataclass(frozen=True)
class CopyTrainSpec:
    """items: how many; min_span..max_span: the copied span's length in tokens; min_gap..max_gap: filler tokens
    between the two copies; min_lead..max_lead: filler tokens before the first copy (an item is lead + 2 * span +
    gap + 2 tokens); filler: "ids" (random pool ids) or "text" (windows of running corpus text); seed: the item
    namespace."""

    items: int = 4000
    min_span: int = 8
    max_span: int = 64
    seed: int = 1
    min_gap: int = 0
    max_gap: int = 0
    filler: str = "ids"
    min_lead: int = 0
    max_lead: int = 0
    paragraph: int = 0
    span_chars: Optional[str] = None

    def __post_init__(self):
        if self.items < 1:
            raise ValueError(f"CopyTrainSpec.items must be >= 1, got {self.items}")
        if not 2 <= self.min_span <= self.max_span:
            raise ValueError(f"CopyTrainSpec: 2 <= min_span <= max_span (got {self.min_span}, {self.max_span})")
        if not 0 <= self.min_gap <= self.max_gap:
            raise ValueError(f"CopyTrainSpec: 0 <= min_gap <= max_gap (got {self.min_gap}, {self.max_gap})")
        if not 0 <= self.min_lead <= self.max_lead:
            raise ValueError(f"CopyTrainSpec: 0 <= min_lead <= max_lead (got {self.min_lead}, {self.max_lead})")
        if self.filler not in FILLERS:
            raise ValueError(f"CopyTrainSpec.filler must be one of {FILLERS}, got {self.filler!r}")
        if self.paragraph < 0 or (self.paragraph and self.filler != "text"):
            raise ValueError(f"CopyTrainSpec.paragraph must be >= 0 and needs filler='text' (got {self.paragraph}, "
                             f"filler={self.filler!r})")


def build_item(pool: Sequence[int], spec: CopyTrainSpec, index: int, bos_id: int, eos_id: int,
               text_ids: Optional[Sequence[int]] = None) -> dict:
    """One item: {"tokens": int32 [L], "mask": uint8 [L], "span": n, "gap": g, "lead": l, "id"} with
    L = l + 2n + g + 2; mask is 1 on the second copy after its first token (tokens l+n+g+2..l+2n+g) and on the
    final EOS. text_ids: the running text the filler is cut from (needed when spec.filler == "text"; at least
    max(max_gap, max_lead) ids)."""
    rng = random.Random(f"copy-train/{spec.seed}/{index}")
    n = rng.randint(spec.min_span, spec.max_span)
    span = [pool[rng.randrange(len(pool))] for _ in range(n)]
    if spec.filler == "text" and (text_ids is None or len(text_ids) < max(spec.max_gap, spec.max_lead)):
        have = "none" if text_ids is None else f"{len(text_ids)} ids"
        raise ValueError(f"copy task: filler='text' needs at least max(max_gap, max_lead)="
                         f"{max(spec.max_gap, spec.max_lead)} text ids, got {have}")

    def filler(k: int) -> list[int]:
        if spec.filler == "text":
            start = rng.randrange(len(text_ids) - k + 1)
            return [int(t) for t in text_ids[start:start + k]]
        return [pool[rng.randrange(len(pool))] for _ in range(k)]

    # no draw for a range that is 0..0, so items without a gap or lead stay as they were before those options
    g = rng.randint(spec.min_gap, spec.max_gap) if spec.max_gap else 0
    gap = filler(g)
    lead_n = rng.randint(spec.min_lead, spec.max_lead) if spec.max_lead else 0
    lead = filler(lead_n) if lead_n else []
    tokens = [bos_id] + lead + span + gap + span + [eos_id]
    mask = [0] * (lead_n + n + g + 2) + [1] * n     # BOS, lead, first copy, gap, second copy's first token: no loss
    return {"tokens": np.asarray(tokens, np.int32), "mask": np.asarray(mask, np.uint8), "span": n, "gap": g,
            "lead": lead_n, "id": f"{SOURCE}/{spec.seed}/{index}"}


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


def running_text(tok: Tokenizer, texts: Sequence[str], paragraph: int = 0) -> np.ndarray:
    """int32 [N]: `texts` encoded and joined, each preceded by a space (as sentences run on in prose); with
    `paragraph` = k > 0, every k-th one starts a new line instead. Newlines matter: a model whose copy records had
    none copied at 0.56-0.62 in spaced prose but 0.19-0.38 where a needle template's newlines surround it."""
    if paragraph < 0:
        raise ValueError(f"running text: paragraph must be >= 0, got {paragraph}")
    seps = ["\n" if paragraph and j % paragraph == 0 else " " for j in range(len(texts))]
    return np.asarray([i for ids in tok.encode_batch([sep + t for sep, t in zip(seps, texts)]) for i in ids],
                      np.int32)


def char_pool(tok: Tokenizer, chars: str) -> list[int]:
    """The sorted ids of `chars`, each of which must encode to one token: a small alphabet (digits, say) whose
    spans repeat symbols, so copying them needs a match on more than the current token (a needle's 7-digit number
    repeats digits; spans of 512 ids rarely repeat one)."""
    ids = {}
    for ch in dict.fromkeys(chars):
        enc = tok.encode(ch)
        if len(enc) != 1:
            raise ValueError(f"copy-task span chars: {ch!r} encodes to {len(enc)} tokens, not 1")
        ids[ch] = enc[0]
    if len(ids) < 2:
        raise ValueError(f"copy-task span chars: need at least 2 distinct characters, got {chars!r}")
    return sorted(set(ids.values()))


def item_inputs(tok: Tokenizer, texts: Sequence[str], spec: CopyTrainSpec,
                pool_size: Optional[int] = None) -> tuple[list[int], Optional[np.ndarray]]:
    """(pool, text_ids) for `build_item`: the span ids (spec.span_chars, else the `pool_size` most frequent ids of
    `texts`) and, for filler="text", the running text (with spec.paragraph line breaks)."""
    pool = char_pool(tok, spec.span_chars) if spec.span_chars else text_pool(tok, texts, pool_size)
    return pool, (running_text(tok, texts, spec.paragraph) if spec.filler == "text" else None)


def write_records(out_dir: str | Path, tok: Tokenizer, spec: CopyTrainSpec, pool: Sequence[int],
                  text_ids: Optional[Sequence[int]] = None) -> dict:
    """Write `<out_dir>/tokens/train/copy_train-*.array_record` (token records with the loss mask) and
    `<out_dir>/summary.json`; returns the summary. text_ids: the gap text for spec.filler == "text"."""
    out_dir = Path(out_dir)
    items = [build_item(pool, spec, i, tok.bos_id, tok.eos_id, text_ids) for i in range(spec.items)]
    recs = [records.encode_token_record(it["tokens"], mask=it["mask"], id=it["id"], source=SOURCE, lang="en",
                                        score=1.0) for it in items]
    shards = records.write_shards(recs, out_dir / "tokens" / "train", SOURCE)
    summary = {"items": len(items), "tokens": int(sum(len(it["tokens"]) for it in items)),
               "loss_tokens": int(sum(int(it["mask"].sum()) for it in items)), "pool": len(pool),
               "spec": dataclasses.asdict(spec), "shards": [str(s) for s in shards]}
    records.write_json(out_dir / "summary.json", summary)
    return summary
