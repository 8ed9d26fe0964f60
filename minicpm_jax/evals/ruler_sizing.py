"""Whether lm-eval's RULER generators can build a task at a length with a tokenizer, checked before they run.

lm-eval's variable-tracking (`ruler_vt`) and common-word (`ruler_cwe`) generators size a prompt by adding noise in
steps (vt: 10 noise lines, and 5 for its 500-token in-context example; cwe: 10 words) while it fits. When even the
first step does not fit they end at zero, and then:
  * ruler_vt loops forever: with no noise its prompt cannot be built, and its retry loop (a bare `except`) never
    shrinks below one step, so `minicpm eval` would hang without a word;
  * ruler_cwe builds items whose answer list is empty, and its scorer divides by that length (ZeroDivisionError
    after the whole generation has run).
A small vocabulary hits this at short lengths: the tests' 1000-piece tokenizer spends ~480 tokens on vt's 5-line
example, and cwe's first step needs 1,010-1,120 tokens at 1024 with the tiny run's tokenizer (depending on the
draw). So before lm-eval builds a task we measure its first step with lm-eval's own generator and the same
tokenizer, and refuse the lengths where it may not fit.

It is an estimate on the safe side, not a replay: lm-eval decides from one random draw, we from the longest of
`DRAWS` draws plus `MARGIN`, and vt's in-context example is taken at the largest step any draw could reach. A refused
length is one lm-eval may fail at, not one it must. The random states the generators use (Python's, numpy's, cwe's
module RNG) are restored afterwards, so a check never changes the items lm-eval then builds. The other offline RULER
tasks need no check: the needle tasks raise their own error when a haystack cannot be built, and `ruler_fwe` always
ends with text to count.

cwe draws from a module-level RNG that lm-eval never reseeds, so each build in a process would differ (a JAX model
and its GGUF, one after the other, would be asked other items): `reseed_generators` puts it back to lm-eval's seed
before each build.

lm-eval is imported inside the functions: importing its RULER utilities loads transformers and builds wonderwords'
word lists, which only RULER runs need.
"""

from __future__ import annotations

import contextlib
import importlib
import random
from typing import Optional

import numpy as np

DRAWS = 64              # random draws per measurement
MARGIN = 1.03           # and 3 % on top of the longest: one lm-eval draw can exceed the longest of ours
VT_ICL_BUDGET = 500     # lm-eval's vt in-context example is sized to 500 tokens (vt_utils.get_dataset)
VT_ICL_STEP, VT_STEP, VT_GEN = 5, 10, 30    # its noise steps and answer budget (vt_utils.sys_vartrack_w_noise_random)
CWE_STEP, CWE_GEN = 10, 120                 # cwe_utils.sys_word_pair_random
CWE_SEED = 42                               # cwe_utils.RNG = random.Random(42)
CHECKED = ("ruler_vt", "ruler_cwe")


def _cwe_utils():
    """lm-eval's cwe module as its task loader last executed it: the loader re-executes a task's module into
    `sys.modules` (a plain `from lm_eval.tasks.ruler import cwe_utils` can hold an older copy)."""
    return importlib.import_module("lm_eval.tasks.ruler.cwe_utils")


def reseed_generators() -> None:
    """Put cwe's module RNG back to its state right after lm-eval imports the module (seeded, then one shuffle of
    the word list), so every ruler_cwe build draws what a fresh process's first build draws. lm-eval's
    `simple_evaluate` reseeds Python's and numpy's RNGs itself, not this one."""
    cwe = _cwe_utils()
    fresh = random.Random(CWE_SEED)
    fresh.shuffle([None] * len(cwe.WORDS))
    cwe.RNG.setstate(fresh.getstate())


@contextlib.contextmanager
def _rng_kept():
    cwe_utils = _cwe_utils()
    py, npy, cwe = random.getstate(), np.random.get_state(), cwe_utils.RNG.getstate()
    try:
        random.seed(0)
        np.random.seed(0)
        cwe_utils.RNG.seed(0)
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        cwe_utils.RNG.setstate(cwe)


def _vt_draws(tok, noises: int, icl: bool) -> list[tuple[int, int, int]]:
    """(tokens as lm-eval's size search measures them: text + f" {answer}", tokens as an in-context example:
    text + " " + answers + blank line, tokens of that answer part alone) of `DRAWS` vt prompts with `noises` noise
    lines."""
    from lm_eval.tasks.ruler import vt_utils

    out = []
    for _ in range(DRAWS):
        text, answer = vt_utils.generate_input_output(noises, 1, 4, is_icl=icl)
        tail = " " + " ".join(answer) + "\n\n"
        out.append((len(tok(text + f" {answer}").input_ids), len(tok(text + tail).input_ids),
                    len(tok(tail).input_ids)))
    return out


def _vt_example_tokens(tok) -> tuple[int, Optional[int]]:
    """(the longest first-step in-context prompt as the search measures it, a bound on the example's tokens as it
    is prepended to every item, or None when the first step may not fit). lm-eval grows the example while its one
    draw fits, so it may stop at any step where the shortest of our draws fits; the example is the longest draw
    there, and never more than the 470 tokens its own loop allows plus the answer."""
    first = _vt_draws(tok, VT_ICL_STEP, True)
    longest_first = max(d[0] for d in first)
    if longest_first * MARGIN + VT_GEN > VT_ICL_BUDGET:
        return longest_first, None
    noises, draws = VT_ICL_STEP, first
    while True:
        more = _vt_draws(tok, noises + VT_ICL_STEP, True)
        if min(d[0] for d in more) + VT_GEN > VT_ICL_BUDGET:
            break
        noises, draws = noises + VT_ICL_STEP, more
    # +1: the answer may not split off the text at a token boundary
    cap = VT_ICL_BUDGET - VT_GEN + max(d[2] for d in draws) + 1
    return longest_first, min(max(d[1] for d in draws), cap)


def vt_problem(tok, length: int) -> Optional[str]:
    """Why lm-eval's ruler_vt may not be built at `length` with the transformers tokenizer `tok`, or None."""
    with _rng_kept():
        first, example = _vt_example_tokens(tok)
        if example is None:
            return (f"its {VT_ICL_BUDGET}-token in-context example needs up to {first + VT_GEN} tokens at its smallest "
                    f"({VT_ICL_STEP} noise lines, {DRAWS} draws) with this tokenizer, at any length (lm-eval's "
                    "generator may loop forever)")
        need = VT_GEN + example + max(d[0] for d in _vt_draws(tok, VT_STEP, False))
    if need * MARGIN > length:
        return (f"its smallest item ({VT_STEP} noise lines after an in-context example of up to {example} tokens, "
                f"{VT_GEN} answer tokens) needs up to {need} tokens in {DRAWS} draws, with a {MARGIN - 1:.0%} margin "
                f"{round(need * MARGIN)} (lm-eval's generator may loop forever)")
    return None


def cwe_problem(tok, length: int) -> Optional[str]:
    """Why lm-eval's ruler_cwe may not be built at `length` with the transformers tokenizer `tok`, or None."""
    cwe_utils = _cwe_utils()
    with _rng_kept():
        need = CWE_GEN
        for _ in range(DRAWS):
            example, text, answer = cwe_utils.generate_input_output(CWE_STEP, length)
            numbered = " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer))
            need = max(need, CWE_GEN + len(tok(example + "\n" + text + " " + numbered).input_ids))
    if need * MARGIN > length:
        return (f"its smallest item ({CWE_STEP} words with its example, {CWE_GEN} answer tokens) needs up to {need} "
                f"tokens in {DRAWS} draws, with a {MARGIN - 1:.0%} margin {round(need * MARGIN)} (lm-eval may build "
                "items with no answer and fail scoring them)")
    return None


def problem(task: str, tokenizer_dir: str, length: int) -> Optional[str]:
    """Why lm-eval's RULER `task` may not be built at `length` tokens with the tokenizer in `tokenizer_dir` (what
    lm-eval itself loads with transformers' AutoTokenizer), or None when it can, or when `task` needs no check."""
    if task not in CHECKED:
        return None
    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    tok = get_tokenizer(str(tokenizer_dir))     # positional, as lm-eval calls it: one cached load for both
    return (vt_problem if task == "ruler_vt" else cwe_problem)(tok, length)
