"""Speculative decoding as in MiniCPM4 (spec §5.2): an EAGLE-2 style draft head over an FR-Spec vocabulary,
verified by the full model so the output is the target's own (greedy: the same tokens; sampling: the same
distribution).

  frequent_ids(counts, size, always)                 FR-Spec id list (frspec.py)
  init_draft(target_cfg, fr_ids, rng) -> Draft       draft head (draft.py)
  speculative_generate(params, cfg, draft, prompts, max_new_tokens, k=4, ...)   (generate.py)
  accept_greedy / accept_sampled                     the acceptance rules (verify.py)
"""

from minicpm_jax.speculative.draft import Draft, EagleDraft, init_draft
from minicpm_jax.speculative.frspec import count_tokens, frequent_ids
from minicpm_jax.speculative.generate import SpeculativeResult, speculative_generate
from minicpm_jax.speculative.verify import accept_greedy, accept_sampled

__all__ = ["Draft", "EagleDraft", "init_draft", "count_tokens", "frequent_ids", "SpeculativeResult",
           "speculative_generate", "accept_greedy", "accept_sampled"]
