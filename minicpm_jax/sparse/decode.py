"""InfLLM v2 decode: a few new queries per row against a KV cache, rows of different lengths.

The T queries of row b sit at positions lengths[b] - T .. lengths[b] - 1 (their keys are already in the cache):
T = 1 for a decode step, a few for speculative verification or a chunked continuation. Block scoring reads the
compressed-key cache (kernels kept incrementally by `update_compressed_cache`), so a step reads ~S/16 kernel keys
plus the ~96 selected blocks instead of the whole cache. Keys at positions >= lengths[b] are masked by causality,
so whatever the cache holds there is ignored.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from minicpm_jax.sparse.compress import CompressedKeyCache
from minicpm_jax.sparse.config import SparseConfig
from minicpm_jax.sparse.dispatch import shard_axes as _axes
from minicpm_jax.sparse.reference import infllm_v2_reference
from minicpm_jax.sparse.select import BlockLists, select_block_lists, validate_shapes
from minicpm_jax.sparse.xla import sparse_decode_xla


def decode_block_lists(q_score: jax.Array, k_cache: jax.Array, lengths: jax.Array, ccache: CompressedKeyCache,
                       cfg: SparseConfig) -> BlockLists:
    """Block lists [B,Hkv,T,k_max] for the decode queries q_score [B,T,Hq,D], scored against the compressed cache."""
    tq = q_score.shape[1]
    t0 = jnp.asarray(lengths, jnp.int32) - tq
    return select_block_lists(q_score, k_cache, cfg, q_offset=t0, chunk=tq, kc=ccache.kc, kc2=ccache.kc2,
                              kernel_count=ccache.count, kernel_count2=ccache.count2)


def infllm_v2_decode(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, lengths: jax.Array,
                     ccache: Optional[CompressedKeyCache], cfg: SparseConfig, impl: str = "xla", *,
                     q_score: Optional[jax.Array] = None, k_score_cache: Optional[jax.Array] = None,
                     interpret=None, pallas_backend: Optional[str] = None, num_splits: Optional[int] = None,
                     mesh=None, batch_axes=None, head_axes=None) -> jax.Array:
    """Sparse attention of the last T tokens of each row (T = 1 for a decode step).

    q: [B,T,Hq,D] (post-RoPE), k_cache/v_cache: [B,S,Hkv,D], lengths: [B] valid keys including the T new ones,
    ccache: compressed cache of the scoring keys (post-RoPE keys, or the pre-RoPE ones when cfg.use_nope; ignored
    by impl="reference", which recomputes kernels from k_score_cache, default k_cache), up to date for all T keys
    (`update_compressed_cache(..., max_new_kernels=T // kernel_stride + 1)`).
    q_score: scoring query (pre-RoPE when cfg.use_nope), default q. Returns [B,T,Hq,D] in q.dtype.
    mesh/batch_axes/head_axes: run per shard under `jax.shard_map` (rows, whole KV groups), as in
    `infllm_v2_attention`.
    """
    validate_shapes(q, k_cache, v_cache)
    if q.shape[1] > k_cache.shape[1]:
        raise ValueError(f"infllm_v2_decode: {q.shape[1]} queries per row exceed the cache capacity "
                         f"{k_cache.shape[1]}; use infllm_v2_attention for a prefill")
    lengths = jnp.asarray(lengths, jnp.int32)
    qs = q if q_score is None else q_score
    if impl == "reference":
        ks = k_cache if k_score_cache is None else k_score_cache
        return infllm_v2_reference(q, k_cache, v_cache, cfg, q_score=qs, k_score=ks, q_offset=lengths - q.shape[1])
    if ccache is None:
        raise ValueError("impl='xla'/'pallas' decode needs the compressed key cache (see compressed_cache_from_keys)")
    if impl not in ("xla", "pallas"):
        raise ValueError(f"impl must be 'reference', 'xla' or 'pallas', got {impl!r}")
    opts = (("interpret", interpret), ("backend", pallas_backend), ("num_splits", num_splits))
    shards = None if mesh is None else (mesh, _axes(batch_axes), _axes(head_axes))
    return _decode_jit(q, qs, k_cache, v_cache, lengths, ccache, cfg=cfg, impl=impl, opts=opts, shards=shards)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "opts", "shards"))
def _decode_jit(q, qs, k_cache, v_cache, lengths, ccache, *, cfg, impl, opts, shards):
    fn = functools.partial(_decode_local, cfg=cfg, impl=impl, opts=opts)
    if shards is not None:
        mesh, rows, heads = shards
        x, r = P(rows, None, heads, None), P(rows)
        cc = CompressedKeyCache(x, r, None if ccache.kc2 is None else x, None if ccache.count2 is None else r)
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(x, x, x, x, r, cc), out_specs=x, check_vma=False)
    return fn(q, qs, k_cache, v_cache, lengths, ccache)


def _decode_local(q, qs, k_cache, v_cache, lengths, ccache, *, cfg, impl, opts):
    """Selection against the compressed cache + attention, on the rows and groups at hand."""
    o = dict(opts)
    tq = q.shape[1]
    t = (lengths - tq)[:, None] + jnp.arange(tq, dtype=jnp.int32)[None, :]
    lists = decode_block_lists(qs, k_cache, lengths, ccache, cfg)
    if impl == "xla":
        return sparse_decode_xla(q, k_cache, v_cache, lists, t, cfg)
    from minicpm_jax.sparse.pallas import sparse_decode_pallas   # loads the Pallas GPU/TPU kernels only when used

    # the decode kernels take one query per row: a few queries run one after another (each its own block list)
    outs = [sparse_decode_pallas(q[:, i:i + 1], k_cache, v_cache, BlockLists(*(x[:, :, i:i + 1] for x in lists)),
                                 t[:, i:i + 1], cfg, interpret=o["interpret"], backend=o["backend"],
                                 num_splits=o["num_splits"]) for i in range(tq)]
    return outs[0] if tq == 1 else jnp.concatenate(outs, axis=1)
