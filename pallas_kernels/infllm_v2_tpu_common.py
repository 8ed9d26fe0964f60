"""Shared pieces of the TPU (Mosaic) InfLLM v2 kernels: layouts, padding rules, SMEM budget, masks.

Verified only in interpret mode on CPU (and by lowering Pallas -> Mosaic for the TPU platform, which checks block
shapes and op support but not Mosaic's own layout pass); they have not been compiled or run on a TPU.

Mosaic constraints and how the kernels meet them:
  * The last two dims of every block are divisible by (8, 128) or equal the full array dims.
      q/o/do rows:  [B, Tq, Hkv*Gp, D], block (Gp, D): Gp = G rounded up to the sublane tile (8 rows for 32-bit,
                    16 for bf16, 32 for 8-bit; zero rows appended to each group), D is the full lane dim.
                    D < 128 is not padded in HBM: Mosaic pads the lanes of each VMEM tile (D=64 uses half of each
                    vreg). MiniCPM4 8B has D = 128.
      K/V:          see `kv_layout`: [B, Tk, Hkv*D] (a free reshape) with block (bs, D) when D % 128 == 0 or
                    Hkv == 1, else a transposed copy [B, Hkv, Tk, D] with block (bs, D) (D = full lane dim).
                    block_size is a multiple of 8 (64 in MiniCPM4).
      lse/delta:    lane-replicated [..., Gp, 128] f32 blocks (Gp, 128), as jax's own TPU flash attention keeps
                    m/l/di; the residual saved between forward and backward is the compact lane 0.
  * Scalar-prefetched block lists are int32 and 1-D (a 2-D SMEM array is padded per row), and must fit in SMEM
    (1 MiB per core on v4 and later, 16 KiB on v2/v3): calls whose lists exceed `SMEM_WORDS` run as a `lax.map`
    over query-token chunks (forward, dq, decode rows) or KV-block ranges (dk/dv).
  * Partial blocks (Tk not a multiple of block_size, a cache longer than a row's length) are read as edge blocks
    whose out-of-range rows hold garbage (NaN in the interpreters): K/V rows a query may not see are zeroed before
    they meet a matmul, so 0 * NaN never reaches an accumulator.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
SUBLANES = 8
SMEM_WORDS = 64 * 1024  # int32 words of scalar prefetch per call: 256 KiB of the 1 MiB SMEM (v4+)
TRANS_B = (((1,), (1,)), ((), ()))  # a @ b.T without materialising the transpose


def on_tpu() -> bool:
    return jax.default_backend() == "tpu"


def resolve_interpret(interpret):
    """Default: compile on TPU, interpret elsewhere. `pltpu.InterpretParams()` is passed through (TPU-faithful
    interpreter: memory spaces, DMAs, uninitialised memory as NaN)."""
    if interpret is None:
        return not on_tpu()
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return bool(interpret)


def compiler_params(semantics):
    """Mosaic compiler params: the slot/chunk axis accumulates in scratch ("arbitrary"), the others are
    independent ("parallel": split across the TensorCores of a megacore chip)."""
    return pltpu.CompilerParams(dimension_semantics=tuple(semantics))


def sublane_rows(dtype) -> int:
    """Rows of one native sublane tile: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit (packed sublanes)."""
    return SUBLANES * max(1, 4 // jnp.dtype(dtype).itemsize)


def tpu_rows(g: int, dtype) -> int:
    """Row tile of one token's query group: G rounded up to whole sublane tiles."""
    r = sublane_rows(dtype)
    return -(-g // r) * r


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def lanes(x):
    """[...] -> [..., 128]: lane-replicated copy (per-row statistics in the layout Mosaic likes)."""
    return jnp.broadcast_to(x[..., None], x.shape + (LANES,))


# ------------------------------------------------------------------------------------------------- K/V layout
def kv_is_view(hkv: int, d: int) -> bool:
    """True when [B, T, Hkv, D] can be read as [B, T, Hkv*D] with (bs, D) blocks (lane-aligned heads)."""
    return d % LANES == 0 or hkv == 1


def kv_layout(x):
    """[B, T, Hkv, D] -> the kernel operand: [B, T, Hkv*D] (free) or [B, Hkv, T, D] (a transposed copy)."""
    b, t, hkv, d = x.shape
    if kv_is_view(hkv, d):
        return x.reshape(b, t, hkv * d)
    return x.transpose(0, 2, 1, 3)


def kv_unlayout(x, hkv: int, d: int):
    """Inverse of kv_layout (for dk/dv outputs)."""
    if kv_is_view(hkv, d):
        b, t, _ = x.shape
        return x.reshape(b, t, hkv, d)
    return x.transpose(0, 2, 1, 3)


def kv_token_axis(hkv: int, d: int) -> int:
    return 1 if kv_is_view(hkv, d) else 2


def kv_spec(hkv: int, d: int, block_size: int, where):
    """BlockSpec of one (block_size, D) K/V block; where(*grid_ids, *prefetch_refs) -> (b, g, block)."""
    if kv_is_view(hkv, d):
        def index(*a):
            b, g, n = where(*a)
            return b, n, g
        return pl.BlockSpec((None, block_size, d), index)

    def index_t(*a):
        b, g, n = where(*a)
        return b, g, n, 0
    return pl.BlockSpec((None, None, block_size, d), index_t)


def zero_rows_after(x, first_row_pos, last_visible):
    """Zero the rows of a K/V block [bs, D] whose key position (first_row_pos + row) exceeds last_visible."""
    rows = first_row_pos + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.where(rows <= last_visible, x, jnp.zeros_like(x))


# ----------------------------------------------------------------------------------------- SMEM-bounded calls
def tokens_per_call(n_tok: int, words_per_token: int, smem_words: int) -> int:
    """Query tokens (or decode rows) per pallas_call so the scalar-prefetched lists fit the SMEM budget."""
    return min(n_tok, max(1, smem_words // max(words_per_token, 1)))


def map_chunks(fn, args, axes, n: int, chunk: int, out_axes, out_len=None):
    """fn(i, *args) over chunks of `chunk` along each arg's axis (None: passed whole), as a lax.map.

    The chunked axes are zero-padded to a multiple of chunk; fn gets the chunk number i first and returns a
    sequence; its outputs are concatenated along out_axes and cut to out_len (default n).
    """
    if chunk >= n:
        return list(fn(jnp.int32(0), *args))
    r = cdiv(n, chunk)

    def split(x, ax):
        pad = [(0, 0)] * x.ndim
        pad[ax] = (0, r * chunk - n)
        x = jnp.pad(x, pad)
        x = x.reshape(x.shape[:ax] + (r, chunk) + x.shape[ax + 1:])
        return jnp.moveaxis(x, ax, 0)

    mapped = [split(x, ax) for x, ax in zip(args, axes) if ax is not None]

    def body(carry):
        i, parts = carry
        it = iter(parts)
        full = [next(it) if ax is not None else x for x, ax in zip(args, axes)]
        return fn(i, *full)

    outs = jax.lax.map(body, (jnp.arange(r, dtype=jnp.int32), mapped))

    def merge(o, ax):
        o = jnp.moveaxis(o, 0, ax)
        o = o.reshape(o.shape[:ax] + (r * o.shape[ax + 1],) + o.shape[ax + 2:])
        return jax.lax.slice_in_dim(o, 0, n if out_len is None else out_len, axis=ax)

    return [merge(o, ax) for o, ax in zip(outs, out_axes)]
