"""`mc.generate`: plain cached decoding, or speculative decoding when a draft head is given (same arguments,
same result type; greedy output is identical either way)."""

from __future__ import annotations

from typing import Optional, Sequence

from minicpm_jax import decode
from minicpm_jax.speculative.draft import Draft
from minicpm_jax.speculative.generate import speculative_generate


def generate(params, cfg, prompt_ids, max_new_tokens: int = 32, *, draft: Optional[Draft] = None,
             draft_tokens: int = 4, draft_tree: Optional[Sequence[int]] = None, **kwargs) -> decode.GenerateResult:
    """Generate continuations for a batch of prompts (see `minicpm_jax.decode.generate` for the arguments).

    draft: an EAGLE draft head (`minicpm_jax.speculative`) proposing `draft_tokens` tokens per target pass; the
    result is then a `SpeculativeResult` (a GenerateResult with acceptance statistics).
    draft_tree: with a draft, propose a static tree instead of a chain, e.g. (4, 2, 1): 4 children of the last
    token, 2 of each of those, 1 of each of those (`speculative_generate(tree=...)`); draft_tokens is then unused."""
    if draft is None:
        if draft_tree is not None:
            raise ValueError("draft_tree needs a draft head (draft=...)")
        return decode.generate(params, cfg, prompt_ids, max_new_tokens, **kwargs)
    return speculative_generate(params, cfg, draft, prompt_ids, max_new_tokens, k=draft_tokens, tree=draft_tree,
                                **kwargs)
