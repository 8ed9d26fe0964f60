"""Glue between the sparse API and `pallas_kernels/`: block lists in, kernels out, optionally under shard_map.

The kernels know arrays and block ids only. Here the selection result (select.py) is handed to them, and for
sharded inputs each kernel runs per shard inside `jax.shard_map` (a bare pallas_call on sharded arrays is silently
all-gathered under an Auto mesh and rejected under an Explicit one, jax-notes §4.5). Batch shards over
`batch_axes`; KV heads, and with them their query-head groups, over `head_axes` (Hkv must divide evenly).
"""

from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import PartitionSpec as P

from minicpm_jax.sparse.config import SparseConfig
from minicpm_jax.sparse.select import BlockLists
from pallas_kernels.infllm_v2_bwd import infllm_v2_attention_pallas
from pallas_kernels.infllm_v2_decode import infllm_v2_decode_kernel

BACKENDS = ("triton",)


def _backend(backend: Optional[str]) -> str:
    backend = backend or "triton"
    if backend not in BACKENDS:
        raise ValueError(f"pallas_backend must be one of {BACKENDS}, got {backend!r}")
    if jax.default_backend() == "tpu":
        raise NotImplementedError("InfLLM v2 Pallas kernels target GPU (Triton lowering); on TPU use impl='xla'")
    return backend


def _maybe_shard(fn, mesh, batch_axes, head_axes, n_args_qkv: int):
    if mesh is None:
        return fn
    qkv = P(batch_axes, None, head_axes, None)
    lists = (P(batch_axes, head_axes, None, None), P(batch_axes, head_axes, None))
    specs = (qkv,) * n_args_qkv + lists + (P(batch_axes, None),)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)


def sparse_attention_pallas(q, k, v, lists: BlockLists, t, cfg: SparseConfig, *, interpret=None, backend=None,
                            mesh=None, batch_axes=None, head_axes=None):
    """Differentiable Pallas block-sparse attention over precomputed block lists. Shapes as in xla.py."""
    _backend(backend)

    def run(q_, k_, v_, idx, count, pos):
        return infllm_v2_attention_pallas(q_, k_, v_, idx, count, pos, block_size=cfg.block_size, interpret=interpret)

    return _maybe_shard(run, mesh, batch_axes, head_axes, 3)(q, k, v, lists.idx, lists.count, t)


def sparse_decode_pallas(q, k_cache, v_cache, lists: BlockLists, t, cfg: SparseConfig, *, interpret=None,
                         backend=None, num_splits=None, mesh=None, batch_axes=None, head_axes=None):
    """Pallas sparse decode: q [B,1,Hq,D] over the cache with block lists [B,Hkv,1,K]."""
    _backend(backend)

    def run(q_, k_, v_, idx, count, pos):
        return infllm_v2_decode_kernel(q_, k_, v_, idx, count, pos, block_size=cfg.block_size, num_splits=num_splits,
                                       interpret=interpret)

    return _maybe_shard(run, mesh, batch_axes, head_axes, 3)(q, k_cache, v_cache, lists.idx, lists.count, t)
