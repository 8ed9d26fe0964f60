"""Glue between the sparse API and `pallas_kernels/`: block lists in, kernels out, optionally under shard_map.

Backends: "triton" (GPU kernels, infllm_v2_{fwd,bwd,decode}.py; the default off TPU) and "mosaic_tpu" (TPU
kernels, infllm_v2_tpu_{fwd,bwd,decode}.py; the default when jax.default_backend() == "tpu"). Either runs in
interpret mode off its hardware (interpret=None picks it), so CPU tests exercise both; the TPU kernels are
verified only that way (and by lowering to Mosaic), not on a TPU.

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
from pallas_kernels.infllm_v2_tpu_bwd import infllm_v2_tpu_attention
from pallas_kernels.infllm_v2_tpu_decode import infllm_v2_tpu_decode_kernel

BACKENDS = ("triton", "mosaic_tpu")


def _backend(backend: Optional[str]) -> str:
    on_tpu = jax.default_backend() == "tpu"
    backend = backend or ("mosaic_tpu" if on_tpu else "triton")
    if backend not in BACKENDS:
        raise ValueError(f"pallas_backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton" and on_tpu:
        raise NotImplementedError("the Triton kernels do not run on TPU; use pallas_backend='mosaic_tpu'")
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
    kernel = infllm_v2_tpu_attention if _backend(backend) == "mosaic_tpu" else infllm_v2_attention_pallas

    def run(q_, k_, v_, idx, count, pos):
        return kernel(q_, k_, v_, idx, count, pos, block_size=cfg.block_size, interpret=interpret)

    return _maybe_shard(run, mesh, batch_axes, head_axes, 3)(q, k, v, lists.idx, lists.count, t)


def sparse_decode_pallas(q, k_cache, v_cache, lists: BlockLists, t, cfg: SparseConfig, *, interpret=None,
                         backend=None, num_splits=None, mesh=None, batch_axes=None, head_axes=None):
    """Pallas sparse decode: q [B,1,Hq,D] over the cache with block lists [B,Hkv,1,K]."""
    kernel = infllm_v2_tpu_decode_kernel if _backend(backend) == "mosaic_tpu" else infllm_v2_decode_kernel

    def run(q_, k_, v_, idx, count, pos):
        return kernel(q_, k_, v_, idx, count, pos, block_size=cfg.block_size, num_splits=num_splits,
                      interpret=interpret)

    return _maybe_shard(run, mesh, batch_axes, head_axes, 3)(q, k_cache, v_cache, lists.idx, lists.count, t)
