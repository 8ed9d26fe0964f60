"""Cached model application over per-layer weights: the stacked layer parameters split once into L separate arrays.

Why: XLA:CPU cannot feed a dot from a slice of a bigger array. In the scanned layer loop every layer's weights are
first copied out of the stacked [L, ...] parameter (a dynamic-slice), then read again by the matvec: a decode step
moves each weight byte about three times. Split once per generation call (outside the token loop), every matvec
reads its own buffer once. GPU/TPU backends fuse the slice into the dot, so callers split only on CPU
(`split_for_backend`).

The math is `MiniCPM.__call__` with a cache, layer by layer (`DecoderLayer` applied to its own parameters); tests
hold both paths to the same logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minicpm_jax.config import ModelConfig
from minicpm_jax.layers import RMSNorm, dtype_of
from minicpm_jax.model import DecoderLayer, head_logits
from minicpm_jax.rope import rope_cos_sin


def is_split(params) -> bool:
    """Whether `params["layers"]` already holds one parameter dict per layer (a tuple)."""
    return isinstance(params.get("layers"), tuple)


def split_layers(params) -> dict:
    """params with "layers" ({name: [L, ...]} stacked) replaced by a tuple of L per-layer dicts ({name: [...]});
    every other entry is shared. Inside a jit this costs one copy of the layer weights."""
    if is_split(params):
        return params
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    layers = tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n))
    return {**params, "layers": layers}


def split_for_backend(params) -> dict:
    """`split_layers` on the CPU backend (where it pays), the stacked params unchanged elsewhere."""
    return split_layers(params) if jax.default_backend() == "cpu" else params


def apply_split(params, cfg: ModelConfig, attention: str, mode: str, tokens, positions, q_slot, cache, write_start,
                valid_lengths, logits_index, return_hidden: bool, tree=None):
    """`MiniCPM(cfg, attention, mode).apply(...)` with a cache, for split params.

    Args:
      params: from `split_layers`. tokens int32 [B, T]; positions / q_slot int32 [B, T].
      cache: (k, v, sparse) with k, v [L, B, S, Hkv, D] and sparse stacked over L (or None).
      write_start, valid_lengths: int32 [B]; logits_index: int32 [B] or None (all T positions).
      tree: a `TreeLayout` when the T tokens are the nodes of a draft tree (speculative tree verification).
    Returns:
      (float32 logits [B, T', V] or the hidden state [B, T', H] when return_hidden, (k, v, sparse)).
    """
    dtype = dtype_of(cfg.dtype)
    k_all, v_all, sc_all = cache
    h = jnp.take(params["embed_tokens"], tokens, axis=0).astype(dtype) * jnp.asarray(cfg.scale_emb, dtype)
    cos, sin = rope_cos_sin(cfg, positions, valid_lengths)
    layer = DecoderLayer(cfg, attention, mode, tree)
    slots = write_start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]      # [B, T] slots written
    rows = jnp.arange(tokens.shape[0])[:, None]
    new_k, new_v, new_sc = [], [], []
    for i, lp in enumerate(params["layers"]):
        sc = None if sc_all is None else jax.tree.map(lambda x: x[i], sc_all)
        h, (kc, vc, sc) = layer.apply({"params": lp}, h, (k_all[i], v_all[i], sc), cos, sin, q_slot, None,
                                      write_start, valid_lengths)
        new_k.append(kc[rows, slots])                                 # [B, T, Hkv, D]: the slots just written
        new_v.append(vc[rows, slots])
        new_sc.append(sc)
    # one scatter of the new slots into the donated cache after all layers read it: in place. Storing each layer's
    # updated cache as it comes (k_all.at[i].set(kc)) makes XLA copy the whole stacked cache once per layer.
    k_all = k_all.at[:, rows, slots].set(jnp.stack(new_k), mode="drop")
    v_all = v_all.at[:, rows, slots].set(jnp.stack(new_v), mode="drop")
    if sc_all is not None:
        sc_all = jax.tree.map(lambda *x: jnp.stack(x), *new_sc)
    h = RMSNorm(cfg).apply({"params": params["norm"]}, h)
    h = h / jnp.asarray(cfg.width_mult, dtype)
    if logits_index is not None:
        h = jnp.take_along_axis(h, logits_index[:, None, None], axis=1)
    if return_hidden:
        return h, (k_all, v_all, sc_all)
    return head_logits(cfg, params["embed_tokens"], params.get("lm_head"), h), (k_all, v_all, sc_all)
