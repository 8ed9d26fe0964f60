"""Stage 0 of InfLLM v2: parameter-free mean pooling of keys into scoring kernels, and its decode-time cache.

Kernel j covers keys [j*stride, j*stride + kernel_size). Only complete kernels exist (a kernel that would run past
the sequence is dropped, as in the official `calc_chunks_with_stride`), so a sequence of L keys has
`num_kernels(L) = max((L - kernel_size) // stride + 1, 0)` kernels. Values are never compressed: the kernels only
score blocks. With `lse_approx` a second, coarse set (4x kernel, 4x stride) gives the softmax normaliser (§2.2).

During decode the kernels are kept in `CompressedKeyCache` and grow by one each time `stride` more keys are
written (a kernel is complete once its last key exists), which is exactly what recomputing them from the keys
would give.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from minicpm_jax.sparse.config import SparseConfig

COARSE_FACTOR = 4  # coarse kernels for the LSE approximation: 4x kernel size, 4x stride ([V2] §3.4, [SALA])


def num_kernels(length, kernel_size: int, stride: int):
    """Number of complete kernels in `length` keys; works on Python ints and on int arrays."""
    if isinstance(length, int):
        return max((length - kernel_size) // stride + 1, 0)
    return jnp.maximum((length - kernel_size) // stride + 1, 0)


def coarse_sizes(cfg: SparseConfig) -> tuple[int, int]:
    """(kernel size, stride) of the coarse kernels used by `lse_approx`."""
    return COARSE_FACTOR * cfg.kernel_size, COARSE_FACTOR * cfg.kernel_stride


def compress_keys(k: jax.Array, kernel_size: int, stride: int) -> jax.Array:
    """Mean of every complete kernel.

    k: [B, L, H, D] any float dtype -> [B, num_kernels(L), H, D] float32.
    Uses stride-sized partial sums (kernel_size is a multiple of stride), so the cost is one pass over the keys.
    """
    b, length, h, d = k.shape
    r = kernel_size // stride
    n = num_kernels(length, kernel_size, stride)
    if n == 0:
        return jnp.zeros((b, 0, h, d), jnp.float32)
    n_chunks = length // stride
    cs = k[:, : n_chunks * stride].astype(jnp.float32).reshape(b, n_chunks, stride, h, d).sum(axis=2)
    total = cs[:, 0:n]
    for i in range(1, r):  # r = kernel_size // stride (2 for MiniCPM4): a handful of shifted adds
        total = total + cs[:, i : i + n]
    return total / kernel_size


@flax.struct.dataclass
class CompressedKeyCache:
    """Decode-time compressed keys, one row per batch element (rows may have different lengths).

    kc:      [B, max_kernels, Hkv, D]   mean-pooled kernels (kernel_size / kernel_stride); rows >= count are
                                       never read (zero, unless a rollback left old kernels there).
    count:   [B] int32                  complete kernels stored per row (= num_kernels(length) when up to date).
    kc2:     [B, max_kernels2, Hkv, D] or None   coarse kernels (lse_approx only).
    count2:  [B] int32 or None
    """

    kc: jax.Array
    count: jax.Array
    kc2: Optional[jax.Array] = None
    count2: Optional[jax.Array] = None


def init_compressed_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, cfg: SparseConfig,
                          dtype=jnp.float32) -> CompressedKeyCache:
    """Empty cache able to hold the kernels of `max_len` keys per row."""
    nk = max(num_kernels(max_len, cfg.kernel_size, cfg.kernel_stride), 1)
    kc = jnp.zeros((batch, nk, num_kv_heads, head_dim), dtype)
    count = jnp.zeros((batch,), jnp.int32)
    if not cfg.lse_approx:
        return CompressedKeyCache(kc, count)
    ks2, st2 = coarse_sizes(cfg)
    nk2 = max(num_kernels(max_len, ks2, st2), 1)
    return CompressedKeyCache(kc, count, jnp.zeros((batch, nk2, num_kv_heads, head_dim), dtype), count.copy())


def _from_keys(k_cache, lengths, ks, st, n_max, dtype):
    kc = compress_keys(k_cache, ks, st)  # [B, n(S), H, D]
    n = kc.shape[1]
    count = num_kernels(lengths.astype(jnp.int32), ks, st).astype(jnp.int32)
    kc = jnp.where(jnp.arange(n)[None, :, None, None] < count[:, None, None, None], kc, 0.0)
    if n < n_max:
        kc = jnp.pad(kc, ((0, 0), (0, n_max - n), (0, 0), (0, 0)))
    return kc[:, :n_max].astype(dtype), jnp.minimum(count, n_max)


def compressed_cache_from_keys(k_cache: jax.Array, lengths: jax.Array, cfg: SparseConfig, max_len: Optional[int] = None,
                               dtype=None) -> CompressedKeyCache:
    """Build the cache from scratch (after prefill).

    k_cache: [B, S, Hkv, D] (keys used for scoring: post-RoPE, or pre-RoPE when cfg.use_nope);
    lengths: [B] valid keys per row; max_len: capacity in keys (default S). Returns kernels in `dtype`
    (default k_cache.dtype).
    """
    max_len = k_cache.shape[1] if max_len is None else max_len
    dtype = k_cache.dtype if dtype is None else dtype
    lengths = jnp.asarray(lengths, jnp.int32)
    n_max = max(num_kernels(max_len, cfg.kernel_size, cfg.kernel_stride), 1)
    kc, count = _from_keys(k_cache, lengths, cfg.kernel_size, cfg.kernel_stride, n_max, dtype)
    if not cfg.lse_approx:
        return CompressedKeyCache(kc, count)
    ks2, st2 = coarse_sizes(cfg)
    n2_max = max(num_kernels(max_len, ks2, st2), 1)
    kc2, count2 = _from_keys(k_cache, lengths, ks2, st2, n2_max, dtype)
    return CompressedKeyCache(kc, count, kc2, count2)


def _append(kc, count, k_cache, new_lengths, ks, st, max_new):
    """Append up to `max_new` newly completed kernels per row (vectorised over rows)."""
    b, s, h, d = k_cache.shape
    target = num_kernels(new_lengths, ks, st).astype(jnp.int32)

    def one_row(kc_r, count_r, k_r, target_r):
        n_rows = kc_r.shape[0]
        # Updated as [NK*H, D] rows, the view the decode scoring multiplies with: updating the [NK, H, D] view
        # made XLA:CPU fuse the update into both that view and the returned cache, copying the cache every step.
        kc_r = kc_r.reshape(n_rows * h, d)
        for i in range(max_new):  # static, 1 for one-token decode steps
            j = count_r + i
            start = jnp.clip(j * st, 0, max(s - ks, 0))
            win = jax.lax.dynamic_slice(k_r, (start, 0, 0), (min(ks, s), h, d)).astype(jnp.float32)
            mean = win.reshape(ks // st, st, h, d).sum(axis=1).sum(axis=0) / ks if s >= ks else jnp.zeros((h, d))
            # Rows >= count are never read, so row j can be written whether or not its kernel is complete (0
            # if not, keeping a fresh cache all-zero there); not reading the old row keeps XLA from copying the
            # donated cache first. j past the capacity is dropped.
            done = (j < target_r).astype(kc_r.dtype)
            kc_r = kc_r.at[j * h + jnp.arange(h)].set(mean.astype(kc_r.dtype) * done, mode="drop")
        new_count = jnp.minimum(jnp.minimum(target_r, count_r + max_new), n_rows)
        return kc_r.reshape(n_rows, h, d), jnp.maximum(new_count, count_r)

    return jax.vmap(one_row)(kc, count, k_cache, target)


def update_compressed_cache(ccache: CompressedKeyCache, k_cache: jax.Array, new_lengths: jax.Array, cfg: SparseConfig,
                            *, max_new_kernels: int = 1) -> CompressedKeyCache:
    """Incremental update after a decode step wrote new keys.

    k_cache: [B, S, Hkv, D] with `new_lengths` [B] valid keys per row. Appends the mean of every kernel that became
    complete, at most `max_new_kernels` per row and call (one decode token completes at most one kernel; pass more
    when a step writes more than `kernel_stride` tokens, e.g. speculative verification). A row that lags keeps
    catching up on later calls: `count` always says which kernels are stored.
    """
    new_lengths = jnp.asarray(new_lengths, jnp.int32)
    kc, count = _append(ccache.kc, ccache.count, k_cache, new_lengths, cfg.kernel_size, cfg.kernel_stride,
                        max_new_kernels)
    if ccache.kc2 is None:
        return CompressedKeyCache(kc, count)
    ks2, st2 = coarse_sizes(cfg)
    kc2, count2 = _append(ccache.kc2, ccache.count2, k_cache, new_lengths, ks2, st2, max_new_kernels)
    return CompressedKeyCache(kc, count, kc2, count2)


def rollback_compressed_cache(ccache: CompressedKeyCache, lengths: jax.Array, cfg: SparseConfig) -> CompressedKeyCache:
    """Forget the kernels completed by tokens at positions >= lengths [B] (e.g. rejected speculative tokens).

    Only `count` changes: stored rows past it are never read and are overwritten as the row grows again. Rows
    already shorter are left as they are. Works on any leading batch shape of count (e.g. [L, B] stacked layers)."""
    lengths = jnp.asarray(lengths, jnp.int32)
    count = jnp.minimum(ccache.count, num_kernels(lengths, cfg.kernel_size, cfg.kernel_stride).astype(jnp.int32))
    if ccache.kc2 is None:
        return ccache.replace(count=count)
    ks2, st2 = coarse_sizes(cfg)
    count2 = jnp.minimum(ccache.count2, num_kernels(lengths, ks2, st2).astype(jnp.int32))
    return ccache.replace(count=count, count2=count2)
