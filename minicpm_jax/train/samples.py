"""Sample continuations of a few prompts with the trained weights (the end-of-run smoke test a person reads), and a
draft run's check of speculative against plain decoding."""

from __future__ import annotations

from typing import Sequence

import jax

from minicpm_jax.config import ModelConfig
from minicpm_jax.decode import generate
from minicpm_jax.speculative.draft import Draft
from minicpm_jax.speculative.generate import speculative_generate


def sample_text(params, cfg: ModelConfig, tokenizer, prompts: Sequence[str], n_tokens: int, *, chat: bool = False,
                temperature: float = 0.8, top_p: float = 0.9, seed: int = 0) -> list[str]:
    """Continuations of `prompts` (chat: each a user turn in the tokenizer's chat template, answered until an EOS id).

    Sampled with temperature / top-p by default: greedy decoding of a small model repeats one token ("的的的…");
    temperature=0 gives the greedy text.
    """
    if not prompts:
        return []
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
             if chat else p for p in prompts]
    ids = [tokenizer.encode(t, add_bos=True) for t in texts]
    out = generate(params, cfg, ids, max_new_tokens=n_tokens, temperature=temperature, top_p=top_p,
                   rng=jax.random.key(seed))
    return [p + " -> " + tokenizer.decode([t for t in seq if t not in cfg.eos_ids]) if chat
            else p + tokenizer.decode(seq) for p, seq in zip(prompts, out.sequences())]


def check_draft(params, cfg: ModelConfig, draft: Draft, tokenizer, prompts: Sequence[str], n_tokens: int, k: int,
                attention: str = "auto") -> dict:
    """A draft run's end-of-run check: greedy decoding of `prompts` with the draft proposing k tokens per target
    pass against plain greedy decoding. Returns {"exact": identical tokens, "tokens_per_pass": generated tokens per
    verification pass (plain decoding: 1), "accepted_per_pass": drafted tokens kept per pass, "text": the
    continuations}."""
    if not prompts:
        return {}
    ids = [tokenizer.encode(p, add_bos=True) for p in prompts]
    plain = generate(params, cfg, ids, max_new_tokens=n_tokens, attention=attention)
    spec = speculative_generate(params, cfg, draft, ids, max_new_tokens=n_tokens, k=k, attention=attention)
    # the first token comes from the prefill; each pass then emits its kept drafts plus one target token
    passes = max(int(spec.target_passes.sum()), 1)
    return {"exact": all(a == b for a, b in zip(plain.sequences(), spec.sequences())),
            "tokens_per_pass": float((spec.lengths - 1).sum()) / passes,
            "accepted_per_pass": float(spec.accepted.sum()) / passes, "draft_tokens": k,
            "text": [p + tokenizer.decode(seq) for p, seq in zip(prompts, spec.sequences())]}
