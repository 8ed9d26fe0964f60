"""Batched generation that stops at stop strings: lm-eval's `generate_until` on the model's cached decode path.

Prompts are prefilled together into one KV cache (`minicpm_jax.decode.prefill`, right-padded rows, dense or InfLLM v2
as `attention` and the cache length decide) and decoded one token per step (`decode_step`), exactly the steps of
`mc.generate`; the difference is that after every step the host decodes each row's new text and retires the rows
that produced a stop string or EOS, and the loop ends as soon as every row is retired instead of running all
`max_new_tokens` steps. A row's text is cut before the first stop string.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.config import ModelConfig
from minicpm_jax.decode import decode_step, prefill
from minicpm_jax.kv_cache import init_cache
from minicpm_jax.sampling import GenerationSettings, sample_token
from minicpm_jax.evals.scoring import bucket


@dataclasses.dataclass
class Generation:
    """text: the continuation cut before the first stop string; tokens: the ids generated (up to and including the
    step that completed the stop string or EOS); stopped: "stop" | "eos" | "length"."""

    text: str
    tokens: list[int]
    stopped: str


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` before the earliest occurrence of any non-empty stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@jax.jit
def _pick(logits, rng, temperature, top_k, top_p):
    rng, sub = jax.random.split(rng)
    return sample_token(logits, sub, temperature, top_k, top_p), rng


def generate_until(params, cfg: ModelConfig, prompts: Sequence[Sequence[int]], decode: Callable[[list[int]], str], *,
                   stop: Sequence[str] = (), max_new_tokens: int = 256, eos_ids: Optional[Sequence[int]] = None,
                   attention: str = "auto", temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   seed: int = 0, pad_id: int = 0) -> list[Generation]:
    """Generate for one batch of prompts (token-id lists, each 1..max_position_embeddings - max_new_tokens long).

    Args:
      decode: token ids -> text (the tokenizer's decode); stop strings are searched in it.
      stop: stop strings; a row stops on the step whose text first contains one.
      eos_ids: ids that end a row (default cfg.eos_ids); the EOS itself adds no text.
    """
    GenerationSettings(max_new_tokens, float(temperature), int(top_k), float(top_p))
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_until: every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"generate_until: a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
                         f"max_position_embeddings={cfg.max_position_embeddings}; truncate the prompt first")
    eos = set(cfg.eos_ids if eos_ids is None else eos_ids)
    b = len(prompts)
    t = min(bucket(longest), cfg.max_position_embeddings)
    tokens = np.full((b, t), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    capacity = -(-(t + max_new_tokens) // 16) * 16                      # as mc.generate sizes its cache
    cache = init_cache(cfg, b, capacity, attention)
    logits, cache = prefill(params, cfg, jnp.asarray(tokens), lengths, cache, attention)
    rng = jax.random.key(seed)
    knobs = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    out: list[list[int]] = [[] for _ in range(b)]
    status: list[Optional[str]] = [None] * b
    for _ in range(max_new_tokens):
        tok, rng = _pick(logits, rng, *knobs)
        host = np.asarray(tok)
        for i in range(b):
            if status[i] is not None:
                continue
            out[i].append(int(host[i]))
            if int(host[i]) in eos:
                status[i] = "eos"
            elif stop and cut_at_stop(decode(out[i]), stop)[1]:
                status[i] = "stop"
        if all(s is not None for s in status):
            break
        logits, cache = decode_step(params, cfg, tok[:, None], cache, attention)
        logits = logits[:, 0]
    result = []
    for ids, st in zip(out, status):
        text_ids = [x for x in ids if x not in eos]
        text, _ = cut_at_stop(decode(text_ids), stop)
        result.append(Generation(text, ids, st or "length"))
    return result
