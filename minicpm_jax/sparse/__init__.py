"""InfLLM v2 trainable sparse attention (MiniCPM4, June-2025 semantics): reference, XLA path, Pallas kernels.

Public API (the model calls these; see dispatch.py and decode.py for details):
  SparseConfig, select_blocks, infllm_v2_attention,
  CompressedKeyCache, init_compressed_cache, compressed_cache_from_keys, update_compressed_cache, infllm_v2_decode.
"""

from minicpm_jax.sparse.compress import (CompressedKeyCache, compressed_cache_from_keys, init_compressed_cache,
                                         update_compressed_cache)
from minicpm_jax.sparse.config import SparseConfig
from minicpm_jax.sparse.decode import infllm_v2_decode
from minicpm_jax.sparse.dispatch import infllm_v2_attention, select_blocks

__all__ = ["SparseConfig", "select_blocks", "infllm_v2_attention", "CompressedKeyCache", "init_compressed_cache",
           "compressed_cache_from_keys", "update_compressed_cache", "infllm_v2_decode"]
