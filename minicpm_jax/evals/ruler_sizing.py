"""Whether lm-eval's RULER generators can build a task at a length with a tokenizer, checked before they run.

lm-eval's variable-tracking (`ruler_vt`) and common-word (`ruler_cwe`) generators size a prompt by adding noise in
steps (vt: 10 noise lines, and 5 for its 500-token in-context example; cwe: 10 words) while it fits. When even the
first step does not fit they end at zero, and then:
  * ruler_vt loops forever: with no noise its prompt cannot be built, and its retry loop (a bare `except`) never
    shrinks below one step, so `minicpm eval` would hang without a word;
  * ruler_cwe builds items whose answer list is empty, and its scorer divides by that length (ZeroDivisionError
    after the whole generation has run).
A small vocabulary hits this at short lengths: the tests' 1000-piece tokenizer spends ~480 tokens on vt's 5-line
example, and cwe's first step does not fit 1024 tokens with any tokenizer tried here. So before lm-eval builds a
task we measure its first step with lm-eval's own generator and the same tokenizer, taking the longest of a few
random draws (the draws' names and words vary in length), and refuse the lengths where it does not fit.

The random states the generators use (Python's, numpy's, cwe's module RNG) are restored afterwards, so a check never
changes the items lm-eval then builds. The other offline RULER tasks need no check: the needle tasks raise their
own error when a haystack cannot be built, and `ruler_fwe` always ends with text to count.
"""

from __future__ import annotations

import contextlib
import random
from typing import Optional

import numpy as np

DRAWS = 16       # random draws per measurement; the longest one must fit
VT_ICL_BUDGET = 500     # lm-eval's vt in-context example is sized to 500 tokens (vt_utils.get_dataset)
VT_ICL_STEP, VT_STEP, VT_GEN = 5, 10, 30    # its noise steps and answer budget (vt_utils.sys_vartrack_w_noise_random)
CWE_STEP, CWE_GEN = 10, 120                 # cwe_utils.sys_word_pair_random
CHECKED = ("ruler_vt", "ruler_cwe")


@contextlib.contextmanager
def _rng_kept():
    from lm_eval.tasks.ruler import cwe_utils

    py, npy, cwe = random.getstate(), np.random.get_state(), cwe_utils.RNG.getstate()
    try:
        random.seed(0)
        np.random.seed(0)
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        cwe_utils.RNG.setstate(cwe)


def _vt_icl_tokens(tok) -> tuple[int, int]:
    """(tokens of the longest first-step in-context prompt as the size search measures it, tokens of the example
    as it is prepended to every item: lm-eval's search replayed, taking the longest draw at the step it stops at)."""
    from lm_eval.tasks.ruler import vt_utils

    def longest(noises: int, as_example: bool) -> int:
        n = 0
        for _ in range(DRAWS):
            text, answer = vt_utils.generate_input_output(noises, 1, 4, is_icl=True)
            text = text + " " + " ".join(answer) + "\n\n" if as_example else text + f" {answer}"
            n = max(n, len(tok(text).input_ids))
        return n

    first = longest(VT_ICL_STEP, False)
    if first + VT_GEN > VT_ICL_BUDGET:
        return first, 0
    noises = VT_ICL_STEP
    while longest(noises + VT_ICL_STEP, False) + VT_GEN <= VT_ICL_BUDGET:
        noises += VT_ICL_STEP
    return first, longest(noises, True)


def vt_problem(tok, length: int) -> Optional[str]:
    """Why lm-eval's ruler_vt cannot be built at `length` with the transformers tokenizer `tok`, or None."""
    from lm_eval.tasks.ruler import vt_utils

    with _rng_kept():
        first, example = _vt_icl_tokens(tok)
        if not example:
            return (f"its {VT_ICL_BUDGET}-token in-context example needs {first + VT_GEN} tokens at its smallest "
                    f"({VT_ICL_STEP} noise lines) with this tokenizer, at any length (lm-eval's generator would loop "
                    "forever)")
        need = VT_GEN + example + max(len(tok(t + f" {a}").input_ids) for t, a in
                                      (vt_utils.generate_input_output(VT_STEP, 1, 4) for _ in range(DRAWS)))
    if need > length:
        return (f"its smallest item ({VT_STEP} noise lines after a {example}-token example, {VT_GEN} answer tokens) "
                f"needs up to {need} tokens in {DRAWS} draws (lm-eval's generator would loop forever)")
    return None


def cwe_problem(tok, length: int) -> Optional[str]:
    """Why lm-eval's ruler_cwe cannot be built at `length` with the transformers tokenizer `tok`, or None."""
    from lm_eval.tasks.ruler import cwe_utils

    with _rng_kept():
        need = CWE_GEN
        for _ in range(DRAWS):
            example, text, answer = cwe_utils.generate_input_output(CWE_STEP, length)
            numbered = " ".join(f"{i + 1}. {w}" for i, w in enumerate(answer))
            need = max(need, CWE_GEN + len(tok(example + "\n" + text + " " + numbered).input_ids))
    if need > length:
        return (f"its smallest item ({CWE_STEP} words with its example, {CWE_GEN} answer tokens) needs up to {need} "
                f"tokens in {DRAWS} draws (lm-eval would build items with no answer and fail scoring them)")
    return None


def problem(task: str, tokenizer_dir: str, length: int) -> Optional[str]:
    """Why lm-eval's RULER `task` cannot be built at `length` tokens with the tokenizer in `tokenizer_dir` (what
    lm-eval itself loads with transformers' AutoTokenizer), or None when it can, or when `task` needs no check."""
    if task not in CHECKED:
        return None
    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    tok = get_tokenizer(str(tokenizer_dir))     # positional, as lm-eval calls it: one cached load for both
    return (vt_problem if task == "ruler_vt" else cwe_problem)(tok, length)
