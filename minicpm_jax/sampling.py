"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus). All knobs are traced values (no recompile).

`GenerationSettings` validates the knobs once for every generation path (JAX `generate`, llama.cpp, the CLI)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


def filtered_logits(logits: jnp.ndarray, temperature, top_k, top_p) -> jnp.ndarray:
    """The distribution sampling draws from, as logits: logits / temperature with tokens outside top-k and top-p
    set to -inf (softmax of the result is that distribution).

    Args:
      logits: float32 [..., V].
      temperature: scalar > 0 (callers handle greedy).
      top_k: int scalar; keep the k most likely tokens (0 = no limit).
      top_p: float scalar in (0, 1]; keep the smallest set whose probability reaches top_p (1 = no limit).
    Returns:
      float32 [..., V].
    """
    temperature = jnp.asarray(temperature, jnp.float32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    sorted_logits = jnp.flip(jnp.sort(scaled, axis=-1), axis=-1)           # descending
    vocab = logits.shape[-1]
    k = jnp.where(jnp.asarray(top_k) > 0, jnp.minimum(jnp.asarray(top_k), vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, jnp.broadcast_to(k - 1, logits.shape[:-1] + (1,)), axis=-1)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    # nucleus: drop tokens once the mass before them already reaches top_p (the first token is always kept)
    probs = jax.nn.softmax(jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < jnp.asarray(top_p, jnp.float32)
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(scaled < cutoff, -jnp.inf, scaled)


def sample_token(logits: jnp.ndarray, rng: jax.Array, temperature, top_k, top_p) -> jnp.ndarray:
    """Pick one token per row.

    Args:
      logits: float32 [B, V].
      temperature: scalar; 0 means greedy (argmax).
      top_k, top_p: see `filtered_logits`.
    Returns:
      int32 [B].
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = jax.random.categorical(rng, filtered_logits(logits, temperature, top_k, top_p), axis=-1)
    return jnp.where(jnp.asarray(temperature, jnp.float32) > 0, sampled.astype(jnp.int32), greedy)


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Generation knobs, validated once and meant the same way by the JAX and the llama.cpp paths.

    max_new_tokens >= 1; temperature >= 0 (0 = greedy); top_k >= 0 (0 = off); top_p in (0, 1] (1 = off).
    Raises ValueError naming the flag (`--top-p` ...) so the CLI can print it as is.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        def need(ok: bool, name: str, rule: str):
            if not ok:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{name} ({flag}) must be {rule}, got {getattr(self, name)!r}")
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
        need(integer(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1")
        need(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0 (0 = greedy)")
        need(integer(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)")
        need(math.isfinite(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1] (1 = off)")

    def fit_prompt(self, prompt_len: int, max_positions: int, truncate: bool = False) -> int:
        """How many tokens to drop from the left of a prompt so prompt + max_new_tokens fit the model's positions.

        Refuses (ValueError) when they do not fit, unless `truncate`; never truncates away the whole prompt."""
        over = prompt_len + self.max_new_tokens - max_positions
        if over <= 0:
            return 0
        if not truncate or over >= prompt_len:
            raise ValueError(f"the prompt ({prompt_len} tokens) plus --max-new-tokens ({self.max_new_tokens}) exceed "
                             f"the model's {max_positions} positions; shorten the prompt, lower --max-new-tokens, or "
                             "pass --truncate-prompt to drop its oldest tokens")
        return over
