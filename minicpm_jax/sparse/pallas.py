"""Glue between the sparse API and `pallas_kernels/`: block lists in, kernels out, optionally under shard_map.

Backends: "triton" (GPU kernels, infllm_v2_{fwd,bwd,decode}.py; the default off TPU) and "mosaic_tpu" (TPU
kernels, infllm_v2_tpu_{fwd,bwd,decode}.py; the default when jax.default_backend() == "tpu"). Either runs in
interpret mode off its hardware (interpret=None picks it), so CPU tests exercise both; the TPU kernels are
verified only that way (and by lowering to Mosaic), not on a TPU.

The kernels know arrays and block ids only. Here the selection result (select.py) is handed to them. They take one
device's arrays: on a mesh, dispatch.py / decode.py run selection and kernels per shard inside `jax.shard_map` (a
bare pallas_call on sharded arrays is silently all-gathered under an Auto mesh and rejected under an Explicit one,
jax-notes §4.5).
"""

from __future__ import annotations

from typing import Optional

import jax

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


def sparse_attention_pallas(q, k, v, lists: BlockLists, t, cfg: SparseConfig, *, interpret=None, backend=None):
    """Differentiable Pallas block-sparse attention over precomputed block lists. Shapes as in xla.py.

    Takes the arrays of one device: on a mesh the caller (`dispatch.infllm_v2_attention`) runs it per shard."""
    kernel = infllm_v2_tpu_attention if _backend(backend) == "mosaic_tpu" else infllm_v2_attention_pallas
    return kernel(q, k, v, lists.idx, lists.count, t, block_size=cfg.block_size, interpret=interpret)


def sparse_decode_pallas(q, k_cache, v_cache, lists: BlockLists, t, cfg: SparseConfig, *, interpret=None,
                         backend=None, num_splits=None):
    """Pallas sparse decode: q [B,1,Hq,D] over the cache with block lists [B,Hkv,1,K] (one device's arrays)."""
    kernel = infllm_v2_tpu_decode_kernel if _backend(backend) == "mosaic_tpu" else infllm_v2_decode_kernel
    return kernel(q, k_cache, v_cache, lists.idx, lists.count, t, block_size=cfg.block_size, num_splits=num_splits,
                  interpret=interpret)
