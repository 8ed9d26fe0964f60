"""Speculative decoding as in MiniCPM4 (spec §5.2): an EAGLE-2 style draft head over an FR-Spec vocabulary,
verified by the full model so the output is the target's own (greedy: the same tokens; sampling: the same
distribution).

  frequent_ids(counts, size, always)                 FR-Spec id list (frspec.py)
  init_draft(target_cfg, fr_ids, rng) -> Draft       draft head (draft.py)
  speculative_generate(params, cfg, draft, prompts, max_new_tokens, k=4, tree=None, ...)   (generate.py)
  accept_greedy / accept_sampled                     the acceptance rules for a chain (verify.py)
  Tree(branching)                                    a static draft tree's topology and masks (tree.py)
  accept_tree_greedy / accept_tree_sampled           the acceptance rules for a tree (tree_accept.py)
  tree_verify_step / compact_tree_cache              one target pass over a tree, keeping a path (tree_step.py)
"""

from minicpm_jax.speculative.draft import Draft, EagleDraft, init_draft
from minicpm_jax.speculative.frspec import count_tokens, frequent_ids
from minicpm_jax.speculative.generate import SpeculativeResult, speculative_generate
from minicpm_jax.speculative.tree import Tree
from minicpm_jax.speculative.tree_accept import accept_tree_greedy, accept_tree_sampled
from minicpm_jax.speculative.tree_step import compact_tree_cache, tree_verify_step
from minicpm_jax.speculative.verify import accept_greedy, accept_sampled

__all__ = ["Draft", "EagleDraft", "init_draft", "count_tokens", "frequent_ids", "SpeculativeResult",
           "speculative_generate", "accept_greedy", "accept_sampled", "Tree", "accept_tree_greedy",
           "accept_tree_sampled", "tree_verify_step", "compact_tree_cache"]
