"""What the two lm-eval backends (`minicpm_jax` on JAX, `minicpm_gguf` on llama.cpp) share, so both read a request
the same way: the tokenizer side of the lm-eval API (`TokenizerLM`), rolling windows for `loglikelihood_rolling`,
the grouping and settings of `generate_until`, and the check of integer model arguments.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterator, Optional, Sequence

from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import normalize_gen_kwargs

from data_pipeline.tokenizer import BOS


def positive_int(backend: str, name: str, value, allow_none: bool = False) -> Optional[int]:
    """`value` (a model argument, maybe a string from lm-eval's command line) as an int >= 1; None when allowed."""
    if value is None and allow_none:
        return None
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = None
    if v is None or v < 1 or (isinstance(value, float) and value != v):
        raise ValueError(f"{backend} model argument {name} must be an integer >= 1, got {value!r}")
    return v


class TokenizerLM(TemplateLM):
    """The lm-eval calls both backends answer from their tokenizer alone. A subclass sets `self.tokenizer` (our
    Tokenizer, or the GGUF's `LlamaCppTokenizer` with the same interface), `self._max_length` and
    `self.add_bos_token`, and implements `_loglikelihood_tokens` and `generate_until`."""

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id   # an empty context is conditioned on BOS, as the model sees documents

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        """Ids of `string`; BOS first when add_bos_token (or add_special_tokens) says so. A string that already starts
        with the BOS text (a rendered chat template) is parsed with its special tokens and gets no second BOS."""
        if add_special_tokens is None and string.startswith(BOS):
            ids = self.tokenizer.encode(string, parse_special=True)
        else:
            add = self.add_bos_token if add_special_tokens is None else add_special_tokens
            ids = self.tokenizer.encode(string, add_bos=bool(add))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: list[int]) -> str:
        """Text of `ids`; ids past the tokenizer's pieces (padding rows of a larger embedding) decode to nothing."""
        n = self.tokenizer.vocab_size
        return self.tokenizer.decode([i for i in ids if i < n])

    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        return self.tokenizer.chat_template if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string scored whole in rolling windows (`loglikelihood_rolling` below)."""
        return loglikelihood_rolling(self, requests, disable_tqdm)

    def _cache_loglikelihoods(self, requests, results: list) -> list:
        """Hand each keyed request's (logprob, greedy) to lm-eval's cache hook; returns `results`."""
        for (key, _, _), r in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return results


def loglikelihood_rolling(lm, requests, disable_tqdm: bool = False) -> list[float]:
    """Each string scored whole, in disjoint windows of `lm.max_length` predictions that each see as much earlier
    text as fits (lm-eval's `get_rolling_token_windows`), conditioned on `lm.prefix_token_id` (BOS).

    `lm` needs tok_encode, prefix_token_id, max_length, _loglikelihood_tokens and cache_hook (a TemplateLM)."""
    windows, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
        toks = lm.tok_encode(string, add_special_tokens=False)
        for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=toks, prefix_token=lm.prefix_token_id, max_seq_len=lm.max_length, context_len=1)):
            windows.append((None, ctx, cont))
            owner.append(i)
    scores = lm._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for i, (lp, _) in zip(owner, scores):
        totals[i] += lp
    for req, total in zip(requests, totals):
        lm.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
    return totals


@dataclasses.dataclass
class GenGroup:
    """Requests (indices) that share generation kwargs. temperature 0 = greedy; top_k 0 and top_p 1 = off."""

    members: list[int]
    until: list[str]
    max_gen: int
    temperature: float
    top_k: int
    top_p: float


def generation_groups(requests: Sequence, default_max_gen: int, max_length: int, backend: str) -> Iterator[GenGroup]:
    """The requests of one `generate_until` call grouped by their kwargs (lm-eval's `normalize_gen_kwargs`: `until`,
    `max_gen_toks`, `do_sample`, `temperature`, `top_k`, `top_p`). Raises ValueError when max_gen_toks leaves no
    room for a prompt in `max_length` positions."""
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
        groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    for members in groups.values():
        kw = normalize_gen_kwargs(requests[members[0]].args[1], default_max_gen)
        until = [s for s in kw.pop("until", []) if s]
        max_gen = int(kw.pop("max_gen_toks"))
        if max_gen >= max_length:
            raise ValueError(f"{backend}: max_gen_toks={max_gen} leaves no room for a prompt in the model's "
                             f"{max_length} positions")
        temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
        yield GenGroup(members, until, max_gen, temperature, int(kw.get("top_k") or 0), float(kw.get("top_p") or 1.0))
