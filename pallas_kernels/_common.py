"""Shared pieces of the InfLLM v2 Pallas kernels (Triton-style lowering: GPU, and CPU with interpret=True).

Layout conventions (all kernels):
  q, o, do: [B, Tq, Hkv*Gp, D]    the query heads of KV group g are rows g*Gp .. g*Gp+G-1 (Gp >= G, zero padded)
  k, v:     [B, Tk, Hkv, D]
  idx:      [B, Hkv, Tq, Kp] int32 selected KV block ids per (group, token); entries >= count are ignored
  count:    [B, Hkv, Tq] int32
  pos:      [B, Tq] int32 absolute query positions (token-level causal mask: key position <= pos)
A kernel knows arrays, shapes and block ids only; the selection rule lives in minicpm_jax/sparse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp() underflows to 0 without inf-inf NaNs


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (x - 1).bit_length()


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def resolve_interpret(interpret) -> bool:
    """Default: compile on GPU, interpret elsewhere (CPU tests)."""
    return (not on_gpu()) if interpret is None else bool(interpret)


def compiler_params(interpret: bool, num_warps: int = 4, num_stages: int = 2):
    """Triton lowering on GPU (a plain pallas_call would go to Mosaic GPU in JAX 0.10, see jax-notes §3.3)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def block_start(blk, block_size: int, kv_len: int):
    """First row to read for KV block `blk`: clamped so a partial last block never reads past the array.

    Rows before blk*block_size that the clamp brings in are masked out by the caller (key position < blk*bs), so
    no padding copy of K/V is needed (this matters for decode, where the cache is large).
    """
    return jnp.minimum(blk * block_size, kv_len - block_size)


def attend_blocks(q, k_ref, v_ref, idx_ref, pos, lo, hi, *, block_size: int, kv_len: int, scale: float,
                  carry=None):
    """Online-softmax attention of q [R, D] over the KV blocks idx_ref[lo:hi] (token causal mask key <= pos).

    k_ref/v_ref: [kv_len, D] (kv_len >= block_size).

    Returns (acc [R, D] unnormalised fp32, m [R], l [R]) in the natural-log domain.
    """
    r, d = q.shape
    bs = block_size
    kpos0 = jnp.arange(bs, dtype=jnp.int32)
    if carry is None:
        carry = (jnp.zeros((r, d), jnp.float32), jnp.full((r,), MASK_VALUE, jnp.float32),
                 jnp.zeros((r,), jnp.float32))

    def body(s, c):
        acc, m, l = c
        blk = idx_ref[s]
        start = block_start(blk, bs, kv_len)
        k = k_ref[pl.ds(start, bs), :]
        v = v_ref[pl.ds(start, bs), :]
        sc = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
        kpos = start + kpos0
        vis = (kpos >= blk * bs) & (kpos <= pos)
        sc = jnp.where(vis[None, :], sc, MASK_VALUE)
        m_new = jnp.maximum(m, sc.max(axis=-1))
        p = jnp.exp(sc - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=-1)
        acc = alpha[:, None] * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, l

    return jax.lax.fori_loop(lo, hi, body, carry)


def pad_groups(x, hkv: int, gp: int):
    """[B, T, Hkv*G, D] -> [B, T, Hkv*Gp, D] with zero rows appended to each group."""
    b, t, hq, d = x.shape
    g = hq // hkv
    if g == gp:
        return x
    x = x.reshape(b, t, hkv, g, d)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, gp - g), (0, 0)))
    return x.reshape(b, t, hkv * gp, d)


def unpad_groups(x, hkv: int, g: int):
    """Inverse of pad_groups."""
    b, t, hqp, d = x.shape
    gp = hqp // hkv
    if g == gp:
        return x
    return x.reshape(b, t, hkv, gp, d)[:, :, :, :g].reshape(b, t, hkv * g, d)


def pad_axis(x, axis: int, n: int, value=0):
    """x with `axis` padded to length n with `value`."""
    if x.shape[axis] == n:
        return x
    w = [(0, 0)] * x.ndim
    w[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, w, constant_values=value)


def pad_last(x, n: int, value=0):
    return pad_axis(x, -1, n, value)


def small_kv(x, block_size: int):
    """[B, T, H, D] shorter than one block -> zero-padded to one block (kernels read whole blocks; tiny copy)."""
    return pad_axis(x, 1, max(x.shape[1], block_size))
