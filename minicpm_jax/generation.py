"""`mc.generate`: plain cached decoding, or speculative decoding when a draft head is given (same arguments,
same result type; greedy output is identical either way)."""

from __future__ import annotations

from typing import Optional

from minicpm_jax import decode
from minicpm_jax.speculative.draft import Draft
from minicpm_jax.speculative.generate import speculative_generate


def generate(params, cfg, prompt_ids, max_new_tokens: int = 32, *, draft: Optional[Draft] = None,
             draft_tokens: int = 4, **kwargs) -> decode.GenerateResult:
    """Generate continuations for a batch of prompts (see `minicpm_jax.decode.generate` for the arguments).

    draft: an EAGLE draft head (`minicpm_jax.speculative`) proposing `draft_tokens` tokens per target pass; the
    result is then a `SpeculativeResult` (a GenerateResult with acceptance statistics)."""
    if draft is None:
        return decode.generate(params, cfg, prompt_ids, max_new_tokens, **kwargs)
    return speculative_generate(params, cfg, draft, prompt_ids, max_new_tokens, k=draft_tokens, **kwargs)
