"""InfLLM v2 trainable sparse attention, both released variants: reference, XLA path, Pallas kernels.

Public API (the model calls these; details in dispatch.py, decode.py, compress.py):
  SparseConfig                                   config.py (HF `sparse_config` names)
  select_blocks(q, k, cfg, *, q_offset=None, impl="xla")            -> bool [B, Hkv, Tq, ceil(Tk/block)]
  infllm_v2_attention(q, k, v, cfg, impl="reference"|"xla"|"pallas", *, segment_ids=None, q_score=None,
                      k_score=None, q_offset=None, ...)             -> [B, Tq, Hq, D]
  CompressedKeyCache(kc [B,NK,Hkv,D], count [B], kc2=None, count2=None)   decode-time kernel means (pytree)
  init_compressed_cache(batch, max_len, num_kv_heads, head_dim, cfg, dtype)
  compressed_cache_from_keys(k_cache, lengths, cfg, max_len=None, dtype=None)
  update_compressed_cache(ccache, k_cache, new_lengths, cfg, *, max_new_kernels=1)
  rollback_compressed_cache(ccache, lengths, cfg)                   forget kernels of tokens >= lengths
  infllm_v2_decode(q, k_cache, v_cache, lengths, ccache, cfg, impl="xla"|"pallas"|"reference", *, q_score=None,
                   k_score_cache=None, ...)                         -> [B, T, Hq, D] (the last T tokens)

What each impl supports:
  reference  exact O(Tq*Tk) masked attention; any group size; lse_approx; use_nope (q_score/k_score); q_offset.
  xla        the same function, memory bounded (selection chunks of 256 queries; init+window as one band matmul per
             64-query chunk; top-k pairs sorted key-block-major into tiles of 128); custom_vjp backward; decode
             against the compressed cache.
  pallas     the same selection (XLA), then the Triton-lowered kernels in pallas_kernels/ (forward, dq, dk/dv with
             the transposed block map, split decode); interpret mode off-GPU; jax.shard_map over batch/KV heads
             when `mesh` is given. Pallas kernels: GPU (Triton lowering) and TPU (Mosaic, backend "mosaic_tpu"; verified in interpret mode and by lowering).
All impls: softmax scale 1/sqrt(D), fp32 accumulation, output in q.dtype, differentiable w.r.t. q, k, v with the
selection under stop_gradient. Packed rows (segment ids marking several documents) raise ValueError: the block
grid, init block and window are defined from a sequence's position 0, so sparse attention needs one document
per row.

Variants (`SparseConfig.variant`, spec §2.3): "minicpm4" (June 2025: window qb-n+1..qb outside a top-`topk` that
counts the init blocks; exact softmax normaliser by default) and "minicpm4.1" (official kernels since 2025-08-25,
the default and what an HF config without `variant` loads as: init and the n+1 local blocks qb-n..qb forced inside a
top-(topk+n); coarse-kernel LSE normaliser by default). Every impl runs both, exactly.

Decisions where the sources leave room (spec §2, §8): group scores are summed (ranking = averaged); with
lse_approx, before any coarse kernel is complete the exact fine-kernel normaliser is used.
"""

from minicpm_jax.sparse.compress import (CompressedKeyCache, compressed_cache_from_keys, init_compressed_cache,
                                         rollback_compressed_cache, update_compressed_cache)
from minicpm_jax.sparse.config import SparseConfig
from minicpm_jax.sparse.decode import infllm_v2_decode
from minicpm_jax.sparse.dispatch import infllm_v2_attention, select_blocks

__all__ = ["SparseConfig", "select_blocks", "infllm_v2_attention", "CompressedKeyCache", "init_compressed_cache",
           "compressed_cache_from_keys", "update_compressed_cache", "rollback_compressed_cache", "infllm_v2_decode"]
