"""Needle-retrieval training records: RULER-style needle items over the corpus's TRAINING text, as token records
whose loss mask covers only the answers (so a continuation can learn retrieval without training on eval text).

One item = BOS, the instruction, a haystack of training sentences with `n` needles "One of the special magic numbers
for <key> is: <7 digits>." at sentence boundaries (the first at the stated depth, the others at random boundaries),
then `n` questions, each followed by its answer, in a random order:

    <BOS>Some special magic numbers are hidden within the following text. ...
    <haystack ... needle ... haystack ... needle ...>
    What is the special magic number for brave-cobalt mentioned in the provided text?
    Answer: The special magic number for brave-cobalt is: 4417203.
    What is the special magic number for ...                          (one question per needle)
    ... is: 9023311.<EOS>

The wording is the English needle eval's (`minicpm_jax.evals.needles.TEMPLATES["en"]`; a test holds the two equal,
this package may not import the model library). What is disjoint from the eval, so scores measure retrieval and not
memory:
  text   the haystack is `wiki_en`'s training units (`split_eval_tail(...)[0]`); the eval haystack is the held-out
         Python reference plus `wiki_en`'s eval tail;
  keys   built from their own word lists (`ADJ`, `NOUN`), which share no word with the eval's;
  seeds  every item draws from `random.Random("needle-train/<seed>/<index>")`, a namespace the eval does not use.
Values are random 7-digit numbers as in the eval (a number can recur by chance; with disjoint keys no key -> number
pair can).

Tokens: the prompt text is encoded at once, as the eval encodes its prompts; each answer " <value>." is encoded on
its own and appended, so the model sees at training time the same token boundary it decodes from at eval time. The
loss mask is 1 on exactly the answer tokens (" <value>." of every question; and the final EOS, so the model learns
to stop) and 0 elsewhere: the haystack's language modelling is left to the corpus part of the mixture.
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from data_pipeline import records
from data_pipeline.corpus import split_eval_tail
from data_pipeline.report import DropReport
from data_pipeline.sources import SOURCES, SourceContext
from data_pipeline.tokenizer import Tokenizer

SOURCE = "needle_train_en"
INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
         "I will quiz you about the numbers afterwards.\n")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text?\n"
            "Answer: The special magic number for {key} is:")
ANSWER = " {value}."
# no word in common with the eval's EN_ADJ / EN_NOUN (tested)
ADJ = ("brave", "cobalt", "dusty", "eager", "fuzzy", "grassy", "humble", "icy", "jolly", "keen", "leafy", "misty",
       "noble", "opal", "proud", "rapid", "sandy", "tidy", "urban", "vivid", "windy", "young", "scarlet", "tranquil")
NOUN = ("acorn", "badger", "candle", "dolphin", "engine", "ferry", "garden", "hammer", "island", "jacket", "kayak",
        "ladder", "mirror", "needle", "otter", "parrot", "rocket", "spoon", "tower", "umbrella", "wagon", "yacht")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


@dataclasses.dataclass(frozen=True)
class NeedleTrainSpec:
    """items: how many; min_tokens..max_tokens: each item's total length (prompt + answers + EOS), drawn uniformly;
    max_needles: needles (= questions) per item, drawn uniformly from 1..max_needles (fewer when they would leave
    under 32 tokens of the length for the haystack); seed: the item namespace."""

    items: int = 1000
    min_tokens: int = 1024
    max_tokens: int = 2048
    max_needles: int = 8
    seed: int = 1

    def __post_init__(self):
        if self.items < 1 or self.max_needles < 1:
            raise ValueError(f"NeedleTrainSpec: items >= 1 and max_needles >= 1 (got {self.items}, {self.max_needles})")
        if not 128 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"NeedleTrainSpec: 128 <= min_tokens <= max_tokens (got {self.min_tokens}, "
                             f"{self.max_tokens})")


def training_sentences() -> tuple[str, ...]:
    """The English training haystack: `wiki_en`'s training units (its eval tail left out, as the corpus splits it),
    whitespace-normalised and cut into sentences of 20..600 characters, in reading order."""
    src, ctx = SOURCES["wiki_en"], SourceContext(DropReport())
    why = src.available(ctx)
    if why is not None:
        raise FileNotFoundError(f"needle training text needs source wiki_en: {why}")
    units = split_eval_tail(src, ctx)[0]
    parts = (s.strip() for u in units for s in _SPLIT.split(re.sub(r"\s+", " ", u).strip()))
    return tuple(s for s in parts if 20 <= len(s) <= 600)


def _pairs(rng: random.Random, n: int) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:                          # distinct keys (neither inside another) and distinct values
        k, v = f"{rng.choice(ADJ)}-{rng.choice(NOUN)}", str(rng.randrange(1_000_000, 10_000_000))
        if all(k != a and v != b and k not in a and a not in k for a, b in pairs):
            pairs.append((k, v))
    return pairs


def build_item(tok: Tokenizer, sents: Sequence[str], spec: NeedleTrainSpec, index: int,
               _counts: Optional[dict] = None) -> dict:
    """One item: {"tokens": int32 [T], "mask": uint8 [T], "answers": [{"key", "value", "token_start",
    "token_end"}] (the answer span of each question in `tokens`, question order), "needles": [{"key", "value",
    "token_start", "token_end"}] (needle sentence spans, text order), "depth" and "depth_key" (the requested depth
    and the key of the needle placed there), "haystack_token_start" / "haystack_token_end" (the span of the text
    between the instruction and the first question, needles included), "length" (the drawn budget,
    T <= length), "haystack_first", "haystack_sentences", "id"}."""
    counts = {} if _counts is None else _counts                # sentence -> estimated tokens (joined with " ")
    rng = random.Random(f"needle-train/{spec.seed}/{index}")
    length = rng.randint(spec.min_tokens, spec.max_tokens)
    depth = rng.random()
    pairs = _pairs(rng, rng.randint(1, spec.max_needles))
    # tokens each needle costs: its sentence, its question and its answer
    cost = [len(tok.encode(NEEDLE.format(key=k, value=v))) + 1 + len(tok.encode(QUESTION.format(key=k)))
            + len(tok.encode(ANSWER.format(value=v))) for k, v in pairs]
    base = 2 + len(tok.encode(INTRO))                           # BOS, instruction, EOS
    while len(pairs) > 1 and base + sum(cost) > length - 32:    # a short length takes fewer needles
        pairs, cost = pairs[:-1], cost[:-1]
    order = list(range(len(pairs)))
    rng.shuffle(order)                                          # questions in a random order
    start = rng.randrange(len(sents))
    budget = length - base - sum(cost)

    def est(j: int) -> int:
        s = sents[j % len(sents)]
        if s not in counts:
            counts[s] = len(tok.encode(s)) + 1
        return counts[s]

    chosen: list[int] = []
    while est(start + len(chosen)) <= budget - sum(est(start + j) for j in range(len(chosen))):
        chosen.append(start + len(chosen))
    while True:           # estimates ignore merges at the joins: measure, drop sentences from the end until it fits
        item = _assemble(tok, sents, chosen, [est(j) for j in chosen], pairs, order, depth, rng.getstate())
        if len(item["tokens"]) <= length or not chosen:
            break
        chosen.pop()
    if len(item["tokens"]) > length:
        raise ValueError(f"needle training length {length} is too short for {len(pairs)} needles and questions")
    prompt = item.pop("prompt")
    if any(prompt.count(v) != 1 or prompt.count(k) != 1 for k, v in pairs):      # a key or value also in the text
        return build_item(tok, sents, spec, index + 1_000_003, counts)          # a fresh draw, deterministic
    item.update(id=f"{SOURCE}/{spec.seed}/{index}", length=length, depth=depth, depth_key=pairs[0][0],
                haystack_first=start % len(sents), haystack_sentences=len(chosen))
    return item


def _assemble(tok: Tokenizer, sents: Sequence[str], chosen: Sequence[int], counts: Sequence[int], pairs, order,
              depth: float, rng_state) -> dict:
    rng = random.Random()
    rng.setstate(rng_state)                                     # the same placement for every trial length
    pieces = [sents[j % len(sents)] for j in chosen]
    cum = np.concatenate([[0], np.cumsum(counts)]) if len(counts) else np.zeros(1)
    at = int(np.argmin(np.abs(cum - depth * cum[-1])))          # boundary nearest the depth (in tokens)
    slots = [at] + [rng.randrange(len(pieces) + 1) for _ in pairs[1:]]
    needles = [NEEDLE.format(key=k, value=v) for k, v in pairs]
    for pos, text in sorted(zip(slots, needles), key=lambda s: s[0], reverse=True):
        pieces.insert(pos, text)
    prompt = INTRO + " ".join(pieces)
    ids, spans = tok.encode_with_offsets(prompt)
    tokens, mask = [tok.bos_id] + list(ids), [0] * (len(ids) + 1)
    hay0 = 1 + next((i for i, (a, e) in enumerate(spans) if e > len(INTRO)), len(spans))
    needle_spans = []
    for text, (k, v) in zip(needles, pairs):
        c0 = prompt.index(text, len(INTRO))
        t0 = 1 + next(i for i, (a, e) in enumerate(spans) if e > c0)
        t1 = 1 + next((i for i, (a, _) in enumerate(spans) if a >= c0 + len(text)), len(spans))
        needle_spans.append({"key": k, "value": v, "token_start": t0, "token_end": t1})
    answers = []
    for i in order:
        k, v = pairs[i]
        q = QUESTION.format(key=k)
        tokens += tok.encode(q)
        mask += [0] * (len(tokens) - len(mask))
        a = tok.encode(ANSWER.format(value=v))
        answers.append({"key": k, "value": v, "token_start": len(tokens), "token_end": len(tokens) + len(a)})
        tokens += a
        mask += [1] * len(a)
    tokens.append(tok.eos_id)
    mask.append(1)                                              # the EOS after the last answer: learn to stop
    needle_spans.sort(key=lambda s: s["token_start"])
    return {"tokens": np.asarray(tokens, np.int32), "mask": np.asarray(mask, np.uint8), "answers": answers,
            "needles": needle_spans, "haystack_token_start": hay0, "haystack_token_end": len(ids) + 1,
            "prompt": prompt}


def build_items(tok: Tokenizer, spec: NeedleTrainSpec, sents: Optional[Sequence[str]] = None) -> list[dict]:
    """`spec.items` items, index 0..items-1; `sents` defaults to `training_sentences()`."""
    sents = training_sentences() if sents is None else tuple(sents)
    counts: dict = {}
    return [build_item(tok, sents, spec, i, counts) for i in range(spec.items)]


def write_records(out_dir: str | Path, tok: Tokenizer, spec: NeedleTrainSpec,
                  sents: Optional[Sequence[str]] = None) -> dict:
    """Write `<out_dir>/tokens/train/needle_train_en-*.array_record` (token records with the answer mask) and
    `<out_dir>/summary.json`; returns the summary (items, tokens, answer tokens, the spec)."""
    out_dir = Path(out_dir)
    items = build_items(tok, spec, sents)
    recs = [records.encode_token_record(it["tokens"], mask=it["mask"], id=it["id"], source=SOURCE, lang="en",
                                        score=1.0) for it in items]
    shards = records.write_shards(recs, out_dir / "tokens" / "train", SOURCE)
    summary = {"items": len(items), "tokens": int(sum(len(it["tokens"]) for it in items)),
               "answer_tokens": int(sum(int(it["mask"].sum()) for it in items)),
               "questions": int(sum(len(it["answers"]) for it in items)),
               "spec": dataclasses.asdict(spec), "shards": [str(s) for s in shards]}
    records.write_json(out_dir / "summary.json", summary)
    return summary
