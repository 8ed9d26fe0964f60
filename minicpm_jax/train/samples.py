"""Sample continuations of a few prompts with the trained weights (the end-of-run smoke test a person reads)."""

from __future__ import annotations

from typing import Sequence

import jax

from minicpm_jax.config import ModelConfig
from minicpm_jax.decode import generate


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
