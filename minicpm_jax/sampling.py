"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus). All knobs are traced values (no recompile)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_token(logits: jnp.ndarray, rng: jax.Array, temperature, top_k, top_p) -> jnp.ndarray:
    """Pick one token per row.

    Args:
      logits: float32 [B, V].
      temperature: scalar; 0 means greedy (argmax).
      top_k: int scalar; keep the k most likely tokens (0 = no limit).
      top_p: float scalar in (0, 1]; keep the smallest set whose probability reaches top_p (1 = no limit).
    Returns:
      int32 [B].
    """
    temperature = jnp.asarray(temperature, jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]                     # descending
    vocab = logits.shape[-1]
    k = jnp.where(jnp.asarray(top_k) > 0, jnp.minimum(jnp.asarray(top_k), vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    # nucleus: drop tokens once the mass before them already reaches top_p (the first token is always kept)
    probs = jax.nn.softmax(jnp.where(sorted_logits < kth, -jnp.inf, sorted_logits), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < jnp.asarray(top_p, jnp.float32)
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    sampled = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
