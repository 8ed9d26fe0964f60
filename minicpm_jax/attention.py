"""Dense causal GQA attention over explicit slots, and the dense / InfLLM v2 dispatch used by the model.

Masking is by slot index, not by position: query t may attend key slot s iff `s <= q_slot[t]` and (for packed
rows) both carry the same segment id. Positions only feed RoPE, so packed documents can restart positions at 0.
Long query blocks are evaluated in chunks (rematerialised in the backward pass) so memory stays O(chunk · S).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite: a fully masked row (padding) yields a uniform softmax instead of NaN


def _attend(q, k, v, q_slot, q_seg, kv_seg, scale):
    """One block of queries. q [B,T,Hkv,G,D]; k/v [B,S,Hkv,D]; q_slot [B,T]; q_seg [B,T] | None; kv_seg [B,S] | None."""
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    s = jnp.arange(k.shape[1])
    allowed = s[None, None, :] <= q_slot[:, :, None]                          # [B, T, S]
    if q_seg is not None:
        allowed &= q_seg[:, :, None] == kv_seg[:, None, :]
    logits = jnp.where(allowed[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


def dense_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, q_slot: jnp.ndarray,
                    q_segment_ids: Optional[jnp.ndarray] = None, kv_segment_ids: Optional[jnp.ndarray] = None,
                    chunk_size: int = 2048) -> jnp.ndarray:
    """Causal grouped-query attention, softmax in float32.

    Args:
      q: [B, T, Hq, D] (post-RoPE); k, v: [B, S, Hkv, D] with Hkv dividing Hq (query head h uses KV head h // G).
      q_slot: int [B, T], the key slot of each query (prefill: arange(T); decode: the cache index written).
      q_segment_ids / kv_segment_ids: int [B, T] / [B, S] or None; keys of another segment are invisible.
      chunk_size: queries per block; blocks are rematerialised in the backward pass.
    Returns:
      [B, T, Hq, D] in q.dtype.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"dense_attention: {hkv} KV heads do not divide {hq} query heads")
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("dense_attention: give both q_segment_ids and kv_segment_ids, or neither")
    scale = 1.0 / math.sqrt(d)
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    if t <= chunk_size:
        out = _attend(qg, k, v, q_slot, q_segment_ids, kv_segment_ids, scale)
        return out.reshape(b, t, hq, d).astype(q.dtype)

    n = -(-t // chunk_size)
    pad = n * chunk_size - t
    padq = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    qc = padq(qg).reshape(b, n, chunk_size, hkv, hq // hkv, d).swapaxes(0, 1)
    slot_c = padq(q_slot).reshape(b, n, chunk_size).swapaxes(0, 1)
    seg_c = None if q_segment_ids is None else padq(q_segment_ids).reshape(b, n, chunk_size).swapaxes(0, 1)

    @jax.checkpoint
    def block(args):
        qi, si, gi = args
        return _attend(qi, k, v, si, gi, kv_segment_ids, scale)

    out = jax.lax.map(block, (qc, slot_c, seg_c))                     # [n, B, C, Hkv, G, D]
    out = out.swapaxes(0, 1).reshape(b, n * chunk_size, hq, d)[:, :t]
    return out.astype(q.dtype)
