"""EAGLE-2 style draft head (spec §5.2): one decoder layer of the target's family over (feature, next token).

    x_j   = fc([RMSNorm_e(embed(token_{j+1})) ; RMSNorm_h(f_j)])   f_j: the target's final feature at position j
    f'_j  = DecoderLayer(x_j)  at position j, own KV cache          (predicts f_{j+1}: the feature regression target)
    logits over the FR-Spec ids = f'_j @ fr_head                    (N of the V ids; FR-Spec)

As OpenBMB ships its heads (CPM.cu `speculative/eagle.py`, spec §3 "MTP / EAGLE head as shipped"): the fc input
is [embedding, hidden] in that order, each half through its own RMSNorm, and the layer counts as layer L+1 of the
target (residual scale scale_depth / sqrt(L+1)). fc has a bias as in EAGLE (UNCONFIRMED for the shipped heads).
The token embedding is the target's (shared, not owned); the draft's own parameters are the two norms, fc, one
layer and the FR head, whose default init is the target's head restricted to the FR ids (so an untrained draft
already scores its predicted features as the target would). Params pytree in, cache pytree in and out.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.config import ModelConfig
from minicpm_jax.kv_cache import KVCache, init_cache
from minicpm_jax.layers import RMSNorm, dtype_of, hidden_init_std
from minicpm_jax.model import DecoderLayer
from minicpm_jax.rope import rope_cos_sin
from minicpm_jax.tree_attention import TreeLayout


def draft_layer_config(target: ModelConfig) -> ModelConfig:
    """The draft layer's config: the target's shapes, one layer, dense attention, and the residual scale of a
    layer L+1 of the target: scale_depth / sqrt(L+1) (set through scale_depth, since one layer divides by 1)."""
    return target.replace(num_hidden_layers=1, sparse_config=None,
                          scale_depth=target.scale_depth / math.sqrt(target.num_hidden_layers + 1))


class Draft(NamedTuple):
    """A draft head ready to decode: params ({"fc", "layer", "fr_head"}), fr_ids int32 [N] (sorted), and the
    config of its layer (`draft_layer_config(target)`)."""

    params: Any
    fr_ids: jnp.ndarray
    cfg: ModelConfig


class EagleDraft(nn.Module):
    """See the module docstring. cfg: the draft layer config; fr_size: N; tree: a decode step over the nodes of one
    depth of a draft tree (`draft_tree_apply`)."""

    cfg: ModelConfig
    fr_size: int
    cache_mode: str = "none"
    tree: Optional[TreeLayout] = None

    @nn.compact
    def __call__(self, feats, next_ids, embedding, positions, cache=None, write_start=None, valid_lengths=None,
                 segment_ids=None):
        """feats [B,T,H] target features, next_ids int32 [B,T] (token after each feature's position), embedding
        [V,H] (the target's), positions int32 [B,T]; cache (k, v) [B,S,Hkv,D] when cache_mode != "none";
        segment_ids int32 [B,T] for packed training rows (cache_mode "none"; positions then restart per document,
        while the causal mask follows the slot index).
        Returns (predicted features [B,T,H], FR logits float32 [B,T,N], new (k, v) or None)."""
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        e = RMSNorm(cfg, name="embed_norm")(jnp.take(embedding, next_ids, axis=0).astype(dtype))
        f = RMSNorm(cfg, name="hidden_norm")(feats.astype(dtype))
        x = nn.Dense(cfg.hidden_size, use_bias=True, dtype=dtype, param_dtype=dtype_of(cfg.param_dtype),
                     kernel_init=nn.initializers.normal(hidden_init_std(cfg)), name="fc")(
            jnp.concatenate([e, f], axis=-1))
        kv_len = None if valid_lengths is None else valid_lengths
        cos, sin = rope_cos_sin(cfg, positions, positions.shape[1] if kv_len is None else kv_len)
        layer_cache = None if cache is None else (cache[0], cache[1], None)
        # the causal mask runs on slots: the cache slots when decoding (= positions), the row index when training
        q_slot = positions if cache is not None else jnp.broadcast_to(
            jnp.arange(positions.shape[1], dtype=jnp.int32), positions.shape)
        h, new_cache = DecoderLayer(cfg, "dense", self.cache_mode, self.tree, name="layer")(
            x, layer_cache, cos, sin, q_slot, segment_ids, write_start, valid_lengths)
        head = self.param("fr_head", nn.initializers.normal(cfg.initializer_range), (cfg.hidden_size, self.fr_size),
                          dtype_of(cfg.param_dtype))
        logits = jnp.einsum("...e,en->...n", h.astype(dtype), head.astype(dtype), preferred_element_type=jnp.float32)
        return h, logits, (None if new_cache is None else new_cache[:2])


def init_draft(target: ModelConfig, fr_ids, rng: jax.Array, target_params=None) -> Draft:
    """A freshly initialised draft head for `target` over the FR-Spec ids `fr_ids` (int [N], sorted, unique).

    target_params: when given, the FR head starts as the target's head at the FR ids (its lm_head columns, or
    the embedding rows when tied); otherwise random."""
    fr_ids = np.asarray(fr_ids, np.int32)
    if fr_ids.ndim != 1 or fr_ids.size == 0 or np.any(np.diff(fr_ids) <= 0) or fr_ids[0] < 0 \
            or fr_ids[-1] >= target.vocab_size:
        raise ValueError(f"fr_ids must be sorted unique ids in [0, {target.vocab_size}), got {fr_ids[:8]}...")
    cfg = draft_layer_config(target)
    h = cfg.hidden_size
    module = EagleDraft(cfg, int(fr_ids.size))
    params = module.init(rng, jnp.zeros((1, 1, h)), jnp.zeros((1, 1), jnp.int32),
                         jnp.zeros((target.vocab_size, h)), jnp.zeros((1, 1), jnp.int32))["params"]
    params = nn.unbox(params)
    if target_params is not None:
        head = target_params["embed_tokens"][fr_ids].T if target.tie_word_embeddings else \
            target_params["lm_head"][:, fr_ids]
        params = {**params, "fr_head": jnp.asarray(head, params["fr_head"].dtype)}
    return Draft(params, jnp.asarray(fr_ids), cfg)


def init_draft_cache(draft: Draft, batch: int, capacity: int) -> KVCache:
    """An empty KV cache for the draft layer (one layer, dense)."""
    return init_cache(draft.cfg, batch, capacity, "dense")


def draft_apply(draft: Draft, embedding, feats, next_ids, cache: Optional[KVCache]):
    """Run the draft over T (feature, next id) pairs appended at each row's cache length (T pairs all valid).

    Returns (predicted features [B,T,H], FR logits [B,T,N], cache advanced by T)."""
    b, t = next_ids.shape
    start = cache.lengths
    pos = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    mode = "decode"
    h, logits, (k, v) = EagleDraft(draft.cfg, int(draft.fr_ids.shape[0]), mode).apply(
        {"params": draft.params}, feats, next_ids, embedding, pos, cache=(cache.k[0], cache.v[0]),
        write_start=start, valid_lengths=start + t)
    return h, logits, cache.replace(k=k[None], v=v[None], lengths=start + t)


def draft_tree_apply(draft: Draft, embedding, feats, next_ids, cache: KVCache, tree: TreeLayout, depth: int):
    """Run the draft over the T nodes of one depth (>= 1) of a draft tree (`speculative.tree.Tree.draft_layout`).

    feats [B,T,H]: each node's parent feature (the draft's prediction there); next_ids int32 [B,T]: the nodes'
    tokens. The cache holds the pairs before the tree (its length, `base`, is the root's position); the nodes' pairs
    sit at position base + depth - 1 (they all predict the token after depth `depth`), are written at tree slots
    base + tree.offset .. and attend the prefix, their ancestors' pairs and themselves. cache.lengths is left at
    base: tree slots are scratch. Returns (predicted features [B,T,H], FR logits [B,T,N], cache)."""
    b, t = next_ids.shape
    base = cache.lengths
    pos = jnp.broadcast_to(base[:, None] + (depth - 1), (b, t)).astype(jnp.int32)
    h, logits, (k, v) = EagleDraft(draft.cfg, int(draft.fr_ids.shape[0]), "decode", tree).apply(
        {"params": draft.params}, feats, next_ids, embedding, pos, cache=(cache.k[0], cache.v[0]),
        write_start=base + tree.offset, valid_lengths=base + tree.num_slots)
    return h, logits, cache.replace(k=k[None], v=v[None])


def fr_to_vocab(fr_logits: jnp.ndarray, fr_ids: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
    """FR logits [..., N] -> full-vocabulary logits [..., V] (-inf outside the FR ids)."""
    full = jnp.full(fr_logits.shape[:-1] + (vocab_size,), -jnp.inf, jnp.float32)
    return full.at[..., fr_ids].set(fr_logits.astype(jnp.float32))
