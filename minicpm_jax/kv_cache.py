"""The decode-time KV cache: an explicit pytree that the model takes and returns (no hidden state)."""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from minicpm_jax.attention_plan import plan_attention
from minicpm_jax import sparse as sp
from minicpm_jax.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer, stacked on a leading layer axis.

    k, v:    [L, B, S, Hkv, D] post-RoPE keys and values; slot s of row b holds position s of that row.
    lengths: int32 [B], tokens already written per row (= the next write slot).
    sparse:  InfLLM v2 compressed-key cache stacked over layers (`minicpm_jax.sparse.CompressedKeyCache` with a
             leading L axis), or None when the model never runs sparse at this capacity.
    """

    k: jnp.ndarray
    v: jnp.ndarray
    lengths: jnp.ndarray
    sparse: Optional[Any] = None

    @property
    def capacity(self) -> int:
        return self.k.shape[2]


def needs_sparse_cache(cfg: ModelConfig, capacity: int, attention: str) -> bool:
    """Whether decoding at this capacity can reach the sparse path (so the compressed keys must be kept)."""
    return plan_attention(cfg, attention, capacity).sparse


def init_cache(cfg: ModelConfig, batch: int, capacity: int, attention: str = "auto", dtype=None) -> KVCache:
    """An empty cache for `batch` rows of up to `capacity` tokens, in the compute dtype unless `dtype` is given."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.num_hidden_layers, batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
    sparse = None
    if needs_sparse_cache(cfg, capacity, attention):
        if cfg.sparse_config.use_nope:
            raise ValueError("cached decoding with sparse_config.use_nope=true would need a pre-RoPE key cache, "
                             "which is not implemented; use use_nope=false (MiniCPM4's setting) for decoding")
        one = sp.init_compressed_cache(batch, capacity, cfg.num_key_value_heads, cfg.head_dim, cfg.sparse_config,
                                       dtype)
        sparse = jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.num_hidden_layers,) + x.shape), one)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32),
                   sparse=sparse)


def write_rows(buf: jnp.ndarray, new: jnp.ndarray, start: jnp.ndarray) -> jnp.ndarray:
    """Write new [B, T, ...] into buf [B, S, ...] at per-row slot offsets start [B]."""
    return jax.vmap(lambda b, x, s: jax.lax.dynamic_update_slice_in_dim(b, x, s, axis=0))(buf, new.astype(buf.dtype),
                                                                                         start)


def truncate_cache(cache: KVCache, cfg: ModelConfig, lengths: jnp.ndarray) -> KVCache:
    """Roll rows back to `lengths` [B] tokens (each <= the row's current length), e.g. after speculative tokens were
    rejected. Slots past a row's length are ignored by every attention path and overwritten by the next write, so
    only the lengths (and the compressed-key counts of the sparse cache) change: O(B) work, no copy."""
    lengths = jnp.minimum(jnp.asarray(lengths, jnp.int32), cache.lengths)
    sparse = cache.sparse
    if sparse is not None:
        sparse = sp.rollback_compressed_cache(sparse, jnp.broadcast_to(lengths, sparse.count.shape), cfg.sparse_config)
    return cache.replace(lengths=lengths, sparse=sparse)
