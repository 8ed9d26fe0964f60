"""RULER-style needle-in-a-haystack items over held-out real text, sized in the model's own tokens.

One item = an instruction, a haystack of held-out sentences (`haystack.sentences(lang)`) with a needle sentence
"One of the special magic numbers for <key> is: <7 digits>." inserted at a sentence boundary at the stated depth
(0 = first, 1 = last), optionally `distractors` more needles with other keys and numbers at random boundaries, and a
question that ends in the answer's lead-in, so the model's next words are the number:

    <BOS>Some special magic numbers are hidden within the following text. ...
    <haystack ... needle ... haystack>
    What is the special magic number for quiet-harbor mentioned in the provided text?
    Answer: The special magic number for quiet-harbor is:

RULER's two variants that ask for several numbers (its niah_multivalue and niah_multiquery, 4 each there):
  values=V   one key with V needles, each its own number; the question asks for all the numbers of that key
  queries=Q  Q keys with a needle (a number) each; the question asks for the numbers of all Q keys
    What are all the special magic numbers for quiet-harbor, amber-lantern, and brisk-meadow mentioned in the
    provided text?
    Answer: The special magic numbers for quiet-harbor, amber-lantern, and brisk-meadow mentioned in the provided
    text are:
The first needle asked about goes at the stated depth, the others at random boundaries (as distractors do). Such
items also record `answers` (every number asked for, the first = `answer`) and `keys` (each answer's key); items
with one number asked have neither, and are the same, byte for byte, as before the variants existed.

Lengths count tokens of `tokenizer` with BOS: prompt tokens + `answer_budget` <= length, and the haystack is filled
until one more sentence would not fit (RULER's convention: the model generates inside the length). Text shorter
than a length repeats from its start. Every item records what was built (`n_tokens`, `needle_token_start`,
`needle_depth` measured in tokens), and is a pure function of (seed, lang, length, depth, index): adding lengths
or depths never changes the other items. The answer is unique: the number and the key occur once in the prompt
(checked), and distractor keys and numbers differ from them; with several numbers asked, every key and number in
the prompt is distinct, each number occurs once and each key in its needles and the question only.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Iterable, Optional, Sequence

from data_pipeline.tokenizer import Tokenizer
from minicpm_jax.evals import haystack

EN_ADJ = ("quiet", "amber", "brisk", "crimson", "distant", "gentle", "hollow", "ivory", "jagged", "lunar", "mellow",
          "narrow", "olive", "placid", "rustic", "silver", "tawny", "velvet", "woolen", "zesty", "frosty", "golden")
EN_NOUN = ("harbor", "lantern", "meadow", "canyon", "falcon", "orchard", "compass", "glacier", "violin", "pebble",
           "anchor", "thimble", "walrus", "quarry", "saddle", "beacon", "lagoon", "marble", "tundra", "kettle")
ZH_ADJ = ("金色", "银色", "安静", "遥远", "温柔", "古老", "明亮", "深蓝", "翠绿", "洁白", "火红", "紫色")
ZH_NOUN = ("灯塔", "罗盘", "风筝", "琵琶", "铜镜", "茶壶", "竹笛", "石桥", "纸伞", "木船", "玉佩", "钟楼")

TEMPLATES = {
    "en": dict(
        intro="Some special magic numbers are hidden within the following text. Make sure to memorize them. "
              "I will quiz you about the numbers afterwards.\n",
        needle="One of the special magic numbers for {key} is: {value}.",
        question="\nWhat is the special magic number for {key} mentioned in the provided text?\n"
                 "Answer: The special magic number for {key} is:",
        question_all="\nWhat are all the special magic numbers for {key} mentioned in the provided text?\n"
                     "Answer: The special magic numbers for {key} mentioned in the provided text are:"),
    "zh": dict(
        intro="下面的文字中藏着一些特别的魔法数字。请记住它们，之后我会问你这些数字。\n",
        needle="{key}的特别魔法数字之一是：{value}。",
        question="\n上文中{key}的特别魔法数字是多少？\n答案：{key}的特别魔法数字是：",
        question_all="\n上文中提到的{key}的所有特别魔法数字是哪些？\n答案：上文中提到的{key}的特别魔法数字是："),
}


# Tokens kept for the answer inside each length, and the generation limit. One number: " 6390028." is 9 tokens
# under the tests' 1000-piece tokenizer (digits split), so 24 leaves room for a false start. Four numbers (RULER's
# count) measured under the same tokenizer: " 6390028, 1234567, 7654321, and 2468013." 37 tokens, the Chinese
# "6390028、1234567、7654321和2468013。" 32, a numbered list " 1. 6390028 2. 1234567 3. 7654321 4. 2468013." 45:
# 64 fits each of these with a fifth number's worth (~9) of slack and does not eat much of a short haystack.
ANSWER_TOKENS = 24
MULTI_ANSWER_TOKENS = 64


@dataclasses.dataclass(frozen=True)
class NeedleSpec:
    """What to build. lengths: prompt + answer budget in tokens; depths in [0, 1]; samples per (length, depth);
    distractors: needles with other keys (and numbers) that are not asked about; seed: of every draw;
    answer_tokens: tokens kept for the answer (None: `answer_budget`'s default); values: numbers hidden for the one
    key asked about (RULER's multi-value); queries: keys asked about, with a number each (RULER's multi-query).
    At most one of values and queries exceeds 1."""

    lang: str = "en"
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 4
    distractors: int = 0
    seed: int = 0
    answer_tokens: Optional[int] = None
    values: int = 1
    queries: int = 1

    def __post_init__(self):
        if self.lang not in TEMPLATES:
            raise ValueError(f"NeedleSpec.lang must be one of {sorted(TEMPLATES)}, got {self.lang!r}")
        if not self.lengths or any(not isinstance(n, int) or n < 64 for n in self.lengths):
            raise ValueError(f"NeedleSpec.lengths must be integers >= 64 (tokens), got {self.lengths!r}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"NeedleSpec.depths must lie in [0, 1], got {self.depths!r}")
        if self.samples < 1 or self.distractors < 0 or (self.answer_tokens is not None and self.answer_tokens < 1):
            raise ValueError(f"NeedleSpec: samples >= 1, distractors >= 0, answer_tokens >= 1 (got {self.samples}, "
                             f"{self.distractors}, {self.answer_tokens})")
        if self.values < 1 or self.queries < 1 or (self.values > 1 and self.queries > 1):
            raise ValueError(f"NeedleSpec.values and NeedleSpec.queries must be >= 1 and not both > 1 (one key with "
                             f"several numbers, or several keys), got values={self.values}, queries={self.queries}")
        keys = len(EN_ADJ) * len(EN_NOUN) if self.lang == "en" else len(ZH_ADJ) * len(ZH_NOUN)
        if self.queries + self.distractors > keys // 2:      # distinct keys are drawn at random: keep that quick
            raise ValueError(f"NeedleSpec: queries + distractors must be at most {keys // 2} for lang {self.lang!r} "
                             f"(distinct keys), got {self.queries + self.distractors}")

    @property
    def asked(self) -> int:
        """How many numbers the question asks for."""
        return self.values * self.queries

    @property
    def answer_budget(self) -> int:
        """Tokens kept for the answer and allowed to generate: `answer_tokens`, by default `ANSWER_TOKENS` for one
        number asked and `MULTI_ANSWER_TOKENS` for several."""
        if self.answer_tokens is not None:
            return self.answer_tokens
        return ANSWER_TOKENS if self.asked == 1 else MULTI_ANSWER_TOKENS

    @property
    def name(self) -> str:
        return (f"niah_{self.lang}" + (f"_mv{self.values}" if self.values > 1 else "")
                + (f"_mq{self.queries}" if self.queries > 1 else "")
                + (f"_d{self.distractors}" if self.distractors else ""))


# The needle tasks by name (`minicpm eval --tasks`; lm-eval's `minicpm_<name>`): what each sets in its NeedleSpec.
# multivalue / multiquery ask for 4 numbers, as RULER's niah_multivalue / niah_multiquery do.
TASKS = {f"niah_{lang}{suffix}": dict(lang=lang, **fields) for lang in ("en", "zh") for suffix, fields in (
    ("", {}), ("_multikey", {"distractors": 3}), ("_multivalue", {"values": 4}), ("_multiquery", {"queries": 4}))}


class _Haystack:
    """The language's sentences with their token counts under one tokenizer (counted once)."""

    def __init__(self, tokenizer: Tokenizer, lang: str):
        self.sents = haystack.sentences(lang)
        self.join = haystack.joiner(lang)
        self.counts = [len(ids) + (1 if self.join else 0)
                       for ids in tokenizer.encode_batch(list(self.sents))]


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _key_value(rng: random.Random, lang: str) -> tuple[str, str]:
    adj, noun = (EN_ADJ, EN_NOUN) if lang == "en" else (ZH_ADJ, ZH_NOUN)
    key = f"{rng.choice(adj)}-{rng.choice(noun)}" if lang == "en" else rng.choice(adj) + "的" + rng.choice(noun)
    return key, _number(rng)


def question(lang: str, keys: Sequence[str], multi: bool) -> str:
    """The question after the haystack, ending in the answer's lead-in. keys: the keys asked about (distinct, in
    needle order); multi: several numbers are asked for ("What are all the special magic numbers for a, b, and c
    ...", also for one key with several numbers), else the one-number question about keys[0]."""
    tpl = TEMPLATES[lang]
    if not multi:
        return tpl["question"].format(key=keys[0])
    if len(keys) == 1:
        joined = keys[0]
    elif lang == "en":          # RULER's query: "a, b, and c"; two keys "a and b"
        joined = f"{keys[0]} and {keys[1]}" if len(keys) == 2 else ", ".join(keys[:-1]) + ", and " + keys[-1]
    else:
        joined = "、".join(keys[:-1]) + "和" + keys[-1]
    return tpl["question_all"].format(key=joined)


def _pairs(rng: random.Random, spec: NeedleSpec) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(asked, distractors): the (key, number) of each needle asked about, the first at the stated depth, and of
    each distractor needle. Keys differ and none contains another, numbers differ; a multi-value item's asked
    needles share one key."""
    pairs: list[tuple[str, str]] = []
    while len(pairs) < spec.queries + spec.distractors:        # distinct keys and values
        k, v = _key_value(rng, spec.lang)
        if all(k != a and v != b and k not in a and a not in k for a, b in pairs):
            pairs.append((k, v))
    asked, others = pairs[:spec.queries], pairs[spec.queries:]
    taken = {v for _, v in pairs}
    while len(asked) < spec.values:        # multi-value: more numbers for the first key, drawn after the keys
        v = _number(rng)
        if v not in taken:
            asked.append((asked[0][0], v))
            taken.add(v)
    return asked, others


def _build(tokenizer: Tokenizer, hay: _Haystack, spec: NeedleSpec, length: int, depth: float, index: int) -> dict:
    multi = spec.asked > 1
    # the variants draw from their own streams; one-number items keep the seed string (and so the items) they had
    variant = f"/v{spec.values}/q{spec.queries}" if multi else ""
    rng = random.Random(f"{spec.seed}/{spec.lang}/{length}/{depth!r}/{index}/{spec.distractors}{variant}")
    tpl = TEMPLATES[spec.lang]
    asked, others = _pairs(rng, spec)
    pairs = asked + others
    key, value = pairs[0]
    needles = [tpl["needle"].format(key=k, value=v) for k, v in pairs]
    keys = list(dict.fromkeys(k for k, _ in asked))          # distinct, in needle order
    intro, question_ = tpl["intro"], question(spec.lang, keys, multi)
    answer_tokens = spec.answer_budget
    fixed = len(tokenizer.encode(intro + question_, add_bos=True)) + sum(
        len(tokenizer.encode(n)) + 1 for n in needles)
    budget = length - answer_tokens - fixed
    if budget < 16:
        raise ValueError(f"needle length {length} leaves {budget} tokens of haystack after the instruction, the "
                         f"needles and {answer_tokens} answer tokens; use a longer length")
    n = len(hay.sents)
    start = rng.randrange(n)
    for _ in range(n):                  # begin at a sentence that fits on its own (a short length, a long sentence)
        if hay.counts[start] <= budget:
            break
        start = (start + 1) % n
    state = rng.getstate()
    chosen: list[int] = []

    def grow(room: int) -> bool:     # append the following sentences while their estimated tokens fit in `room`
        added = False
        while hay.counts[(start + len(chosen)) % n] <= room:
            room -= hay.counts[(start + len(chosen)) % n]
            chosen.append((start + len(chosen)) % n)
            added = True
        return added

    grow(budget)
    shrunk = False
    while True:   # per-sentence counts are estimates: measure the real prompt, then add or drop sentences
        item = _assemble(tokenizer, hay, spec, start, chosen, depth, needles, intro, question_, state)
        room = length - answer_tokens - item["n_tokens"]
        if room < 0 and len(chosen) > 1:
            chosen.pop()
            shrunk = True
        elif room < 0:
            raise ValueError(f"needle length {length}: even one haystack sentence does not fit; use a longer length")
        elif shrunk or not grow(room):
            break
    # the answer is unique: each number occurs once, each key only in its needles and the question (for one number
    # asked: the key 3 times, the needle's and the question's two, a distractor's key once)
    for k, v in pairs:
        if item["prompt"].count(v) != 1 or item["prompt"].count(k) != sum(t.count(k) for t in needles + [question_]):
            return _build(tokenizer, hay, spec, length, depth, index + 100_003)   # a fresh draw, deterministic
    item.update(length=length, depth=depth, key=key, answer=value,
                distractors=[{"key": k, "value": v} for k, v in others],
                id=f"{spec.name}/{length}/{depth:g}/{index}")
    if multi:
        item.update(answers=[v for _, v in asked], keys=[k for k, _ in asked])
    return item


def _assemble(tokenizer: Tokenizer, hay: _Haystack, spec: NeedleSpec, start: int, chosen: Sequence[int], depth: float,
              needles: Sequence[str], intro: str, question: str, rng_state) -> dict:
    rng = random.Random()
    rng.setstate(rng_state)
    pieces = [hay.sents[i] for i in chosen]
    counts = [hay.counts[i] for i in chosen]
    total = sum(counts)
    # the needle goes at the sentence boundary whose token offset is nearest depth * haystack tokens
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    at = min(range(len(cum)), key=lambda j: abs(cum[j] - depth * total))
    others = [j for j in range(len(pieces) + 1) if j != at] or [at]
    slots = [(rng.choice(others), d) for d in needles[1:]] + [(at, needles[0])]   # the needle alone at its boundary
    for pos, text in sorted(slots, key=lambda s: s[0], reverse=True):
        pieces.insert(pos, text)
    body = hay.join.join(pieces)
    prompt = intro + body + question
    ids, spans = tokenizer.encode_with_offsets(prompt)
    c0 = prompt.index(needles[0], len(intro))
    c1 = c0 + len(needles[0])
    b0, b1 = len(intro), len(intro) + len(body)
    # token spans: the byte-fallback pieces of one character share its span, all but the last with zero length
    first = lambda ch: next(i for i, (a, e) in enumerate(spans) if e > ch or a >= ch)   # noqa: E731 first of char ch
    end = lambda ch: next((i for i, (a, _) in enumerate(spans) if a >= ch), len(spans))  # noqa: E731 past char ch-1
    t_n0, t_n1 = first(c0) + 1, end(c1) + 1                # +1: BOS precedes the text
    t_b0, t_b1 = first(b0) + 1, end(b1) + 1
    hay_tokens = (t_b1 - t_b0) - (t_n1 - t_n0)
    return {"prompt": prompt, "lang": spec.lang, "n_tokens": len(ids) + 1, "needle": needles[0],
            "needle_token_start": t_n0, "needle_token_end": t_n1, "haystack_token_start": t_b0,
            "haystack_token_end": t_b1, "needle_depth": (t_n0 - t_b0) / max(hay_tokens, 1),
            "haystack_first": start, "haystack_sentences": len(chosen)}


def build_items(tokenizer: Tokenizer, spec: NeedleSpec) -> list[dict]:
    """All items of `spec`, ordered by length, depth, index."""
    hay = _Haystack(tokenizer, spec.lang)
    return [_build(tokenizer, hay, spec, n, d, i) for n in spec.lengths for d in spec.depths
            for i in range(spec.samples)]


def write_jsonl(items: Iterable[dict], path: str | Path) -> Path:
    """One JSON object per line; a value JSON cannot hold (an lm-eval document's, say) is written as its str."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False, default=str) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
