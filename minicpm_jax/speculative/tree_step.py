"""The target's side of a tree step: verify every node of a draft tree in one cached pass, then compact the
accepted root path into contiguous cache slots so the cache equals plain decoding's over the accepted tokens.

Per row, with the cache holding positions < base: the N nodes are written at slots base .. base+N-1 (breadth
first, the root first), node i at RoPE position base + depth_i, attending the prefix, its ancestors and itself
(dense: a mask; InfLLM v2: a per-node view, see `minicpm_jax.tree_attention`). The written slots are scratch until
`compact_tree_cache` moves the kept path to base .. base+n and sets the length; the compressed-key cache (InfLLM
v2) is not touched by the pass and is extended once, from the compacted keys.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from minicpm_jax import sparse as sp
from minicpm_jax.config import ModelConfig
from minicpm_jax.kv_cache import KVCache, write_rows
from minicpm_jax.model import MiniCPM, compute_logits
from minicpm_jax.speculative.tree import Tree
from minicpm_jax.unstacked import apply_split, is_split


@functools.partial(jax.jit, static_argnames=("cfg", "tree", "attention"))
def tree_verify_step(params, cfg: ModelConfig, node_tokens: jnp.ndarray, cache: KVCache, tree: Tree,
                     attention: str = "auto"):
    """Run the target over the N nodes of `tree` (node_tokens int32 [B, N], the root first) appended at each row's
    cache length.

    Returns (logits float32 [B, N, V], hidden [B, N, H] (÷ width_mult, what the draft reads), cache): the nodes'
    keys and values are written at slots base .. base+N-1 but cache.lengths stays base (see the module docstring)."""
    b, n = node_tokens.shape
    if n != tree.num_nodes:
        raise ValueError(f"tree_verify_step: {n} node tokens for a tree of {tree.num_nodes} nodes")
    base = cache.lengths
    pos = base[:, None] + jnp.asarray(tree.node_depth)[None]
    slots = base[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
    layers = (cache.k, cache.v, cache.sparse)
    if is_split(params):                                   # per-layer weights (what decoding runs on CPU)
        hidden, (k, v, sc) = apply_split(params, cfg, attention, "decode", node_tokens, pos, slots, layers, base,
                                         base + n, None, True, tree=tree.verify_layout())
    else:
        model = MiniCPM(cfg, attention, "decode", tree.verify_layout())
        hidden, (k, v, sc) = model.apply({"params": params}, node_tokens, pos, slots, cache=layers, write_start=base,
                                         valid_lengths=base + n, kv_len=base + n, return_hidden=True)
    return compute_logits(params, cfg, hidden), hidden, KVCache(k=k, v=v, lengths=base, sparse=sc)


def compact_tree_cache(cache: KVCache, cfg: ModelConfig, path: jnp.ndarray, keep: jnp.ndarray) -> KVCache:
    """Keep a root path of the tree written after `tree_verify_step`.

    path: int32 [B, P] tree slots (node indices) of the kept path in depth order, the root first (entries past the
    kept length are ignored); keep: int32 [B], the rows' new lengths (base + kept nodes, base for rows that keep
    nothing). Slot base + j receives node path[j]'s keys and values; the compressed keys are extended to `keep`."""
    base = cache.lengths
    src = base[:, None] + path                                                     # [B, P] cache slots
    move = lambda x: jax.vmap(write_rows, in_axes=(0, 0, None))(
        x, jnp.take_along_axis(x, src[None, :, :, None, None], axis=2), base)     # per layer
    k, v = move(cache.k), move(cache.v)
    sparse = cache.sparse
    if sparse is not None:
        scfg = cfg.sparse_config
        grow = functools.partial(sp.update_compressed_cache, new_lengths=keep, cfg=scfg,
                                 max_new_kernels=path.shape[1] // scfg.kernel_stride + 1)
        sparse = jax.vmap(lambda c, kl: grow(c, kl))(sparse, k)
    return KVCache(k=k, v=v, lengths=jnp.asarray(keep, jnp.int32), sparse=sparse)
