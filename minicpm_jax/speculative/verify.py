"""Accepting drafted tokens: the longest prefix the target agrees with, plus one token from the target.

Greedy: draft token d_{j+1} is kept while it equals argmax of the target's logits at j; the next token is the
target's argmax after the kept prefix, so the output is exactly greedy decoding of the target.
Sampling (Leviathan et al. 2023; Chen et al. 2023): d_{j+1} ~ q_j is kept with probability min(1, p_j(d)/q_j(d));
at the first rejection the next token is drawn from normalise(max(0, p_j - q_j)), and if all k are kept from p_k.
Each emitted token is then distributed exactly as sampling from the target's p (temperature, top-k, top-p applied).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def accept_greedy(target_logits: jnp.ndarray, drafted: jnp.ndarray):
    """target_logits [B, k+1, V] at the positions of (last token, d_1..d_k); drafted int32 [B, k].

    Returns (n_accepted int32 [B] in 0..k, next token int32 [B]: the target's argmax after the kept prefix)."""
    y = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)            # [B, k+1]
    agree = (drafted == y[:, :-1]).astype(jnp.int32)
    n = jnp.cumprod(agree, axis=1).sum(axis=1).astype(jnp.int32)
    return n, jnp.take_along_axis(y, n[:, None], axis=1)[:, 0]


def accept_sampled(p_logits: jnp.ndarray, q_logits: jnp.ndarray, drafted: jnp.ndarray, rng: jax.Array):
    """Speculative sampling.

    p_logits [B, k+1, V]: the target's sampling distribution (already filtered, see sampling.filtered_logits) at
    the positions of (last token, d_1..d_k); q_logits [B, k, V]: the distributions d_1..d_k were drawn from
    (-inf where q is 0); drafted int32 [B, k]. Returns (n_accepted int32 [B], next token int32 [B])."""
    b, k = drafted.shape
    p = jax.nn.softmax(p_logits, axis=-1)
    q = jax.nn.softmax(q_logits, axis=-1)
    p_d = jnp.take_along_axis(p[:, :k], drafted[..., None], axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, drafted[..., None], axis=-1)[..., 0]
    r_accept, r_next = jax.random.split(rng)
    u = jax.random.uniform(r_accept, (b, k))
    keep = (u * q_d < p_d).astype(jnp.int32)                              # u < p/q without dividing by q
    n = jnp.cumprod(keep, axis=1).sum(axis=1).astype(jnp.int32)
    # the residual at the first rejection; after k acceptances, p_k itself (q of a virtual slot k is 0)
    q_pad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
    q_n = jnp.take_along_axis(q_pad, n[:, None, None], axis=1)[:, 0]
    resid = jnp.maximum(p_n - q_n, 0.0)
    # p == q exactly leaves no residual mass; then any draw from p is right (the rejection had probability 0)
    resid = jnp.where(resid.sum(-1, keepdims=True) > 0, resid, p_n)
    nxt = jax.random.categorical(r_next, jnp.log(resid), axis=-1).astype(jnp.int32)
    return n, nxt
