"""The one entry point the model calls: `infllm_v2_attention(..., impl=...)` and `select_blocks`.

impl:
  "reference": exact O(T^2) masked attention (reference.py), the ground truth;
  "xla":       chunked selection + init/window band per query chunk and key-block-major top-k tiles
               (select.py, xla.py), memory bounded, any backend;
  "pallas":    chunked selection + Pallas block-sparse kernels (pallas.py -> pallas_kernels/), GPU (Triton) and TPU
               (Mosaic); on CPU they run in interpret mode (slow: tests only).
All three compute the same function and are differentiable w.r.t. q, k, v (selection under stop_gradient).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from minicpm_jax.attention_plan import check_one_document_per_row
from minicpm_jax.sparse.config import SparseConfig
from minicpm_jax.sparse.reference import infllm_v2_reference, select_blocks_reference
from minicpm_jax.sparse.select import query_positions, select_block_lists, select_blocks_xla, validate_shapes
from minicpm_jax.sparse.xla import sparse_attention_xla

IMPLS = ("reference", "xla", "pallas")


def select_blocks(q: jax.Array, k: jax.Array, cfg: SparseConfig, *, q_offset=None, impl: str = "xla",
                  chunk: int = 256) -> jax.Array:
    """Block selection as a mask: q [B,Tq,Hq,D], k [B,Tk,Hkv,D] (scoring tensors) -> bool [B,Hkv,Tq,ceil(Tk/bs)].

    Queries are the last Tq of the Tk positions unless q_offset (int or [B]) gives the first query's position.
    impl="xla" (default) is chunked and memory bounded; impl="reference" is the O(Tq*Tk) transcription of §2.7.
    """
    validate_shapes(q, k)
    if impl == "reference":
        return select_blocks_reference(q, k, cfg, q_offset=q_offset)
    return _select_blocks_xla_jit(q, k, cfg, q_offset=q_offset, chunk=chunk)


_select_blocks_xla_jit = jax.jit(select_blocks_xla, static_argnames=("cfg", "chunk"))


def infllm_v2_attention(q: jax.Array, k: jax.Array, v: jax.Array, cfg: SparseConfig, impl: str = "reference", *,
                        segment_ids=None, q_score: Optional[jax.Array] = None, k_score: Optional[jax.Array] = None,
                        q_offset=None, chunk: int = 64, tile: int = 128, span: int = 2048, select_chunk: int = 256,
                        interpret=None, pallas_backend: Optional[str] = None, mesh=None, batch_axes=None,
                        head_axes=None) -> jax.Array:
    """InfLLM v2 sparse attention (always sparse; the caller applies `cfg.use_sparse(kv_len)`).

    q: [B,Tq,Hq,D] post-RoPE; k, v: [B,Tk,Hkv,D]; queries are the last Tq positions (or start at q_offset).
    Softmax scale 1/sqrt(D); output [B,Tq,Hq,D] in q.dtype, fp32 accumulation. Any group size Hq/Hkv.
    q_score/k_score: tensors used for block scoring (pre-RoPE when cfg.use_nope); default q/k.
    segment_ids: must be None (or one document per row), see `attention_plan.check_one_document_per_row`.
    chunk, tile, span: XLA path tiling (see sparse_attention_xla): queries per step of the init+window part,
    (query, block) pairs per top-k step, queries whose top-k sums share one buffer.
    Pallas only: interpret (default: True off GPU/TPU), pallas_backend ("triton" | "mosaic_tpu").
    mesh/batch_axes/head_axes (any impl): run selection and attention per shard under `jax.shard_map`, rows over
    batch_axes and whole KV groups over head_axes (see `sharding.attention_layout`), so nothing crosses a row or a
    group; without them the whole computation sees global arrays (one device, or XLA's own partitioning).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    validate_shapes(q, k, v)
    check_one_document_per_row(segment_ids)
    qs = q if q_score is None else q_score
    ks = k if k_score is None else k_score
    static_offset = q_offset is None or isinstance(q_offset, int)
    offset = None if static_offset else jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32).reshape(-1), q.shape[:1])
    opts = (("chunk", chunk), ("tile", tile), ("span", span), ("select_chunk", select_chunk), ("interpret", interpret),
            ("backend", pallas_backend), ("q_offset", q_offset if static_offset else None))
    shards = None if mesh is None else (mesh, shard_axes(batch_axes), shard_axes(head_axes))
    return _sparse_jit(q, k, v, qs, ks, offset, cfg=cfg, impl=impl, opts=opts, shards=shards)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "opts", "shards"))
def _sparse_jit(q, k, v, qs, ks, offset, *, cfg, impl, opts, shards):
    fn = functools.partial(_sparse_local, cfg=cfg, impl=impl, opts=opts)
    args = (q, k, v, qs, ks) + (() if offset is None else (offset,))
    if shards is not None:
        fn = _per_shard(fn, *shards, with_offset=offset is not None)
    return fn(*args)


def shard_axes(a):
    """None, one axis name or a tuple of them -> a hashable PartitionSpec entry."""
    if not a:
        return None
    return a if isinstance(a, str) else (tuple(a) if len(a) > 1 else a[0])


def _per_shard(fn, mesh, batch_axes, head_axes, *, with_offset: bool):
    """fn under shard_map: q/k/v/q_score/k_score split by rows and KV heads (a group's query heads stay together,
    since Hq = G * Hkv is head-major per group), per-row offsets by rows."""
    x = P(batch_axes, None, head_axes, None)
    specs = (x,) * 5 + ((P(batch_axes),) if with_offset else ())
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=x, check_vma=False)


def _sparse_local(q, k, v, qs, ks, offset=None, *, cfg, impl, opts):
    """Selection + attention on the rows and groups at hand (all of them, or one shard's)."""
    o = dict(opts)
    q_offset = o["q_offset"] if offset is None else offset
    if impl == "reference":
        return infllm_v2_reference(q, k, v, cfg, q_score=qs, k_score=ks, q_offset=q_offset)
    b, tq = q.shape[:2]
    t = query_positions(b, tq, k.shape[1], q_offset)
    lists = select_block_lists(qs, ks, cfg, q_offset=q_offset, chunk=o["select_chunk"])
    if impl == "xla":
        return sparse_attention_xla(q, k, v, lists, t, cfg, chunk=o["chunk"], tile=o["tile"], span=o["span"])
    from minicpm_jax.sparse.pallas import sparse_attention_pallas   # loads the Pallas GPU/TPU kernels only when used

    return sparse_attention_pallas(q, k, v, lists, t, cfg, interpret=o["interpret"], backend=o["backend"])
