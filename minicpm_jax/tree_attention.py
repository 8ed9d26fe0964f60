"""Attention of a token tree appended to a KV cache (speculative tree verification and tree drafting).

A cached step normally appends T tokens that form a chain: query t sees every cache slot <= its own. A tree step
appends the nodes of a token tree instead; node i must see the shared prefix (slots < base) and, among the new
slots, only its own root path. `TreeLayout` says which (static, so it is a jit / module constant):

    slot base + j (0 <= j < M) is a tree slot;  query i sees it iff mask[i][j]
    query i itself sits at slot base + offset + i; its RoPE position comes from the caller (base + depth)

Dense attention takes the mask directly. InfLLM v2 cannot: its kernels, block selection and compressed keys are
defined on a contiguous key sequence (a kernel that straddles the prefix and the tree mixes siblings). So a sparse
tree step gives every node its own view of the cache, the prefix followed by its root path at slots base ..
base + depth (`paths`), and runs the ordinary one-query decode of `cfg.sparse_impl` (reference, xla or pallas) on
those B*T views: exactly what plain decoding of that path computes. It costs a [B, T, S] copy of each layer's
keys and values, acceptable for verification trees of a few dozen nodes on the lengths this codebase tests; a
kernel that reads the path through an index map would avoid it. The compressed-key cache is read, never updated
(each view extends it privately): after acceptance the caller compacts the accepted path and updates it once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax import sparse as sp

NEG_INF = -1e30  # finite, as in attention.py


@dataclasses.dataclass(frozen=True)
class TreeLayout:
    """Static description of one tree step (hashable: a Flax module attribute and a jit constant).

    mask:   T rows of M bools: query i may attend tree slot base + j (its ancestors and itself).
    offset: tree slot of query 0 (the queries occupy base + offset .. base + offset + T - 1).
    paths:  per query, the tree slots of its root path in depth order (ending with its own slot), or None when no
            sparse view is needed (the draft's dense layer).
    """

    mask: tuple[tuple[bool, ...], ...]
    offset: int = 0
    paths: Optional[tuple[tuple[int, ...], ...]] = None

    @property
    def num_queries(self) -> int:
        return len(self.mask)

    @property
    def num_slots(self) -> int:
        return len(self.mask[0])

    def mask_array(self) -> np.ndarray:
        return np.asarray(self.mask, bool).reshape(self.num_queries, self.num_slots)


def _visible(base: jnp.ndarray, layout: TreeLayout, s: int) -> jnp.ndarray:
    """bool [B, T, S]: which of S cache slots each query sees (prefix slots < base, tree slots by the mask)."""
    m = layout.num_slots
    rel = jnp.arange(s, dtype=jnp.int32)[None] - base[:, None]                         # [B, S]
    tree = jnp.asarray(layout.mask_array())[:, jnp.clip(rel, 0, m - 1)]                # [T, B, S]
    in_tree = (rel >= 0) & (rel < m)
    return (rel < 0)[:, None, :] | (in_tree[:, None, :] & tree.transpose(1, 0, 2))


def tree_dense_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, base: jnp.ndarray,
                         layout: TreeLayout) -> jnp.ndarray:
    """GQA attention of tree queries over a cache, softmax in float32.

    q: [B, T, Hq, D] (post-RoPE); k, v: [B, S, Hkv, D] with the tree's keys already written; base: int32 [B], the
    first tree slot of each row. Returns [B, T, Hq, D] in q.dtype."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, t, hkv, hq // hkv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    allowed = _visible(base, layout, k.shape[1])
    logits = jnp.where(allowed[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, hq, d).astype(q.dtype)


def path_views(x: jnp.ndarray, base: jnp.ndarray, layout: TreeLayout) -> jnp.ndarray:
    """Per query, the cache as plain decoding of its root path would hold it.

    x: [B, S, ...] cache rows -> [B, T, S, ...]: slots < base unchanged, slot base + j = x[base + paths[i][j]] for
    j <= depth_i; later slots are left as they were (beyond the view's length, never read)."""
    s = x.shape[1]
    m = layout.num_slots
    src = np.tile(np.arange(m, dtype=np.int32), (layout.num_queries, 1))              # identity past the path
    for i, p in enumerate(layout.paths):
        src[i, :len(p)] = p
    rel = jnp.arange(s, dtype=jnp.int32)[None] - base[:, None]                         # [B, S]
    from_tree = base[:, None, None] + jnp.asarray(src)[:, jnp.clip(rel, 0, m - 1)].transpose(1, 0, 2)
    idx = jnp.where(((rel >= 0) & (rel < m))[:, None, :], from_tree, jnp.arange(s, dtype=jnp.int32))   # [B, T, S]
    return jax.vmap(lambda row, i: row[i])(x, idx)


def tree_sparse_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, base: jnp.ndarray,
                          ccache: sp.CompressedKeyCache, layout: TreeLayout, cfg: sp.SparseConfig,
                          impl: str) -> jnp.ndarray:
    """InfLLM v2 attention of tree queries, each on its own root-path view of the cache (module docstring).

    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; base: int32 [B]; ccache: the compressed keys of slots < base (count =
    num_kernels(base), not yet extended by the tree). impl: "reference" | "xla" | "pallas" (`cfg.sparse_impl`).
    Returns [B, T, Hq, D] in q.dtype."""
    if layout.paths is None:
        raise ValueError("tree_sparse_attention needs TreeLayout.paths (each query's root path)")
    b, t, hq, d = q.shape
    rows = lambda x: x.reshape((b * t,) + x.shape[2:])
    kv = [rows(path_views(x, base, layout)) for x in (k, v)]                            # [B*T, S, Hkv, D]
    depth_plus_one = jnp.asarray([len(p) for p in layout.paths], jnp.int32)
    lengths = rows(base[:, None] + depth_plus_one[None])                  # each query is its view's last key
    cc = jax.tree.map(lambda x: jnp.repeat(x, t, axis=0), ccache)       # (absent coarse kernels stay None)
    longest = max(len(p) for p in layout.paths)
    cc = sp.update_compressed_cache(cc, kv[0], lengths, cfg, max_new_kernels=longest // cfg.kernel_stride + 1)
    out = sp.infllm_v2_decode(rows(q)[:, None], kv[0], kv[1], lengths, cc, cfg, impl=impl)
    return out.reshape(b, t, hq, d)
