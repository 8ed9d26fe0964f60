"""A multiple-choice cloze task over held-out English sentences (`haystack.sentences("en")`): which word ends it?

Each item is a sentence cut before its last word (a word of 4+ letters right before the closing punctuation); the
choices are that word and `n_choices - 1` last words of other held-out sentences, shuffled. A model scores by
log-likelihood (lm-eval `multiple_choice`: acc, and acc_norm by length), so chance is 1 / n_choices.
Deterministic from the seed; the sentence set is fixed by the installed packages.
"""

from __future__ import annotations

import random
import re

from minicpm_jax.evals import haystack

_LAST_WORD = re.compile(r"^(?P<ctx>.*\S)\s+(?P<word>[A-Za-z]{4,})(?P<end>[.!?])$")


def cloze_items(n: int = 500, n_choices: int = 4, seed: int = 0) -> list[dict]:
    """Up to `n` items {"id", "context", "choices", "label", "ending"}; `context + " " + choices[label] + ending`
    is the original sentence."""
    if n < 1 or n_choices < 2:
        raise ValueError(f"cloze_items: n >= 1 and n_choices >= 2, got {n}, {n_choices}")
    cands = []
    for s in haystack.sentences("en"):
        m = _LAST_WORD.match(s)
        if m and len(m.group("ctx")) >= 40:
            cands.append((m.group("ctx"), m.group("word"), m.group("end")))
    words = sorted({w.lower() for _, w, _ in cands})
    rng = random.Random(f"cloze/{seed}")
    picked = rng.sample(cands, min(n, len(cands)))
    items = []
    for i, (ctx, word, end) in enumerate(picked):
        others = rng.sample([w for w in words if w != word.lower()], n_choices - 1)
        choices = [word] + [w.capitalize() if word[0].isupper() else w for w in others]
        rng.shuffle(choices)
        items.append({"id": f"cloze_en/{i}", "context": ctx, "choices": choices, "label": choices.index(word),
                      "ending": end})
    return items
