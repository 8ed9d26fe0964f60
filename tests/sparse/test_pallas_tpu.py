"""TPU (Mosaic) InfLLM v2 kernels in interpret mode on CPU: each against its plain-JAX reference, end to end
against impl="reference", and lowered (not compiled) for the TPU platform.

No TPU is available here: interpret mode checks the kernels' math, block indexing and masking (edge blocks read
NaN there, so unmasked garbage would show); `pltpu.InterpretParams()` additionally simulates memory spaces and
DMAs; the Mosaic lowering test checks block shapes and op support. Mosaic's own compile (layouts, VMEM) is not
exercised. Shapes are tiny: interpret mode runs every grid point in sequence.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from minicpm_jax.sparse import compressed_cache_from_keys, infllm_v2_attention, infllm_v2_decode
from minicpm_jax.sparse import pallas as sparse_pallas
from pallas_kernels.infllm_v2_bwd import infllm_v2_vjp_reference
from pallas_kernels.infllm_v2_decode import infllm_v2_decode_reference
from pallas_kernels.infllm_v2_fwd import infllm_v2_fwd_reference
from pallas_kernels.infllm_v2_tpu_bwd import infllm_v2_tpu_attention
from pallas_kernels.infllm_v2_tpu_common import kv_is_view, tpu_rows
from pallas_kernels.infllm_v2_tpu_decode import infllm_v2_tpu_decode_kernel
from pallas_kernels.infllm_v2_tpu_fwd import infllm_v2_tpu_fwd
from sparse_helpers import SMALL, assert_matches, rel_err, unambiguous

BS = SMALL.block_size


def random_lists(seed, pos, hkv, kmax, n_blocks):
    """Block lists as the kernels take them, drawn at random (the kernels must follow any lists): per (row,
    group, token) 1..kmax distinct blocks <= the token's block, the token's own block always included, in random
    order; slots past count hold an out-of-range id the kernels must never read."""
    rng = np.random.default_rng(seed)
    b, tq = pos.shape
    idx = np.full((b, hkv, tq, kmax), 10 ** 6, np.int32)
    count = np.zeros((b, hkv, tq), np.int32)
    for bi, g, ti in np.ndindex(b, hkv, tq):
        qb = min(int(pos[bi, ti]) // BS, n_blocks - 1)
        n = int(rng.integers(1, min(kmax, qb + 1) + 1))
        blocks = np.concatenate([[qb], rng.choice(qb, n - 1, replace=False)]) if n > 1 else np.array([qb])
        idx[bi, g, ti, :n] = rng.permutation(blocks)
        count[bi, g, ti] = n
    return jnp.asarray(idx), jnp.asarray(count)


def _inputs(seed, b, t, hq, hkv, d, dtype=jnp.float32, kmax=4):
    """numpy-drawn q, k, v, do (no eager JAX ops to compile) and random block lists for queries 0..t-1."""
    rng = np.random.default_rng(seed)
    arr = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
    q, k, v, do = arr(b, t, hq, d), arr(b, t, hkv, d), arr(b, t, hkv, d), arr(b, t, hq, d)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    idx, count = random_lists(seed, pos, hkv, kmax, -(-t // BS))
    return q, k, v, do, idx, count, jnp.asarray(pos)


_fwd_ref = jax.jit(functools.partial(infllm_v2_fwd_reference, block_size=BS))
_vjp_ref = jax.jit(functools.partial(infllm_v2_vjp_reference, block_size=BS))


def _check_op(q, k, v, do, idx, count, t, **kw):
    """Forward output and dq/dk/dv of the custom_vjp op (fwd, dq, dk/dv kernels) against the references."""
    f = lambda q_, k_, v_: infllm_v2_tpu_attention(q_, k_, v_, idx, count, t, block_size=BS, interpret=True, **kw)

    def run(a, b, c):
        o, vjp = jax.vjp(f, a, b, c)
        return o, vjp(do)

    o, got = jax.jit(run)(q, k, v)
    assert rel_err(o, _fwd_ref(q, k, v, idx, count, t)[0]) < 1e-5
    for name, a, b in zip("qkv", got, _vjp_ref(q, k, v, idx, count, t, do)):
        assert rel_err(a, b) < 1e-5, ("d" + name, rel_err(a, b))


@pytest.mark.parametrize("hq,hkv,b,t", [(1, 1, 1, 11), (4, 2, 2, 45), (8, 1, 1, 50), (16, 1, 1, 50)])
def test_kernels_match_reference_fwd_and_vjp(hq, hkv, b, t):
    """G = 1, 2, 8, 16. t=11: shorter than one block (padded to one); 45/50: a partial last block (edge block
    read as NaN by the interpreter beyond the array). Random block lists, random order and counts."""
    _check_op(*_inputs(hq + t, b, t, hq, hkv, 16))


def test_calls_split_to_fit_smem():
    """A tiny SMEM budget forces lax.map over token chunks (forward, dq) and over KV-block ranges (dk/dv)."""
    _check_op(*_inputs(3, 1, 50, 4, 2, 16, kmax=5), smem_words=20)


def test_fwd_kernel_lse_tpu_faithful_interpreter():
    """pltpu.InterpretParams: VMEM/SMEM/HBM simulated, DMAs issued per block, uninitialised memory NaN."""
    q, k, v, _, idx, count, t = _inputs(5, 1, 21, 2, 1, 16)
    o, lse = jax.jit(lambda *a: infllm_v2_tpu_fwd(*a, block_size=BS, interpret=pltpu.InterpretParams()))(
        q, k, v, idx, count, t)
    o_r, lse_r = _fwd_ref(q, k, v, idx, count, t)
    assert rel_err(o, o_r) < 1e-5 and rel_err(lse, lse_r) < 1e-5


def test_fwd_kernel_bf16_pads_groups_to_16_rows():
    assert tpu_rows(2, jnp.bfloat16) == 16 and tpu_rows(2, jnp.float32) == 8 and tpu_rows(16, jnp.float32) == 16
    q, k, v, _, idx, count, t = _inputs(6, 1, 40, 4, 2, 16, jnp.bfloat16)
    o, lse = jax.jit(lambda *a: infllm_v2_tpu_fwd(*a, block_size=BS, interpret=True))(q, k, v, idx, count, t)
    o_r, lse_r = _fwd_ref(q, k, v, idx, count, t)
    assert o.dtype == jnp.bfloat16
    assert rel_err(o, o_r) < 2e-2 and rel_err(lse, lse_r) < 1e-2


@pytest.mark.parametrize("d,num_splits,smem", [(128, 3, 1 << 16), (16, 2, 20)])
def test_decode_kernel_matches_its_reference(d, num_splits, smem):
    """Rows of different lengths over a cache of 90 (partial last block); D=128 reads the cache in place
    ([B,S,Hkv*D] view), D=16 through the transposed copy; smem=20 maps over row chunks."""
    assert kv_is_view(2, 128) and not kv_is_view(2, 16)
    rng = np.random.default_rng(d)
    q, k, v = (jnp.asarray(rng.standard_normal(s, np.float32)) for s in ((3, 1, 8, d), (3, 90, 2, d), (3, 90, 2, d)))
    lengths = jnp.array([90, 61, 17])
    t = (lengths - 1)[:, None]
    idx, count = random_lists(d, np.asarray(t), 2, 5, 6)
    o = jax.jit(lambda *a: infllm_v2_tpu_decode_kernel(*a, block_size=BS, num_splits=num_splits, interpret=True,
                                                       smem_words=smem))(q, k, v, idx, count, t)
    o_r = infllm_v2_decode_reference(q, k, v, idx, count, t, block_size=BS)
    assert rel_err(o, o_r) < 1e-5


def test_end_to_end_matches_reference():
    """infllm_v2_attention(impl="pallas", pallas_backend="mosaic_tpu"): selection + TPU kernels, forward and
    gradients, against impl="reference" (G=2; the other group sizes are covered kernel by kernel above)."""
    q, k, v = unambiguous(1, 83, 4, 2, 16, SMALL, seed=2)  # 83: not a multiple of block or kernel size
    ref = lambda q_, k_, v_: infllm_v2_attention(q_, k_, v_, SMALL, "reference")
    pal = lambda q_, k_, v_: infllm_v2_attention(q_, k_, v_, SMALL, "pallas", pallas_backend="mosaic_tpu",
                                                 interpret=True)
    assert_matches(pal, ref, q, k, v)


def test_end_to_end_decode_matches_reference():
    s = 150
    q, k, v = unambiguous(3, s, 8, 2, 16, SMALL, seed=4)
    lengths = jnp.array([150, 101, 9])
    qd = q[jnp.arange(3), lengths - 1][:, None]
    cc = compressed_cache_from_keys(k, lengths, SMALL)
    ref = infllm_v2_decode(qd, k, v, lengths, None, SMALL, "reference")
    out = infllm_v2_decode(qd, k, v, lengths, cc, SMALL, "pallas", pallas_backend="mosaic_tpu", interpret=True,
                           num_splits=2)
    assert rel_err(out, ref) < 1e-5


def test_backend_selection(monkeypatch):
    assert sparse_pallas._backend("mosaic_tpu") == "mosaic_tpu"
    assert sparse_pallas._backend(None) == "triton"                    # CPU/GPU default
    with pytest.raises(ValueError):
        sparse_pallas._backend("mosaic_gpu")
    monkeypatch.setattr(sparse_pallas.jax, "default_backend", lambda: "tpu")
    assert sparse_pallas._backend(None) == "mosaic_tpu"                # auto-selected on TPU
    with pytest.raises(NotImplementedError):
        sparse_pallas._backend("triton")


@pytest.mark.parametrize("dtype,d", [(jnp.float32, 16), (jnp.bfloat16, 128)])
def test_kernels_lower_to_mosaic_for_tpu(dtype, d):
    """Pallas -> Mosaic lowering for the TPU platform (no TPU needed): block shapes satisfy the (8, 128) rule,
    scalar prefetch and every op in the kernels lower. Mosaic's compile itself is not run."""
    q, k, v, do, idx, count, t = _inputs(1, 1, 64, 4, 2, d, dtype)

    def train(q_, k_, v_):
        f = lambda a, b, c: infllm_v2_tpu_attention(a, b, c, idx, count, t, block_size=BS,
                                                    interpret=False, smem_words=40)  # chunked calls too
        o, vjp = jax.vjp(f, q_, k_, v_)
        return o, vjp(do)

    text = jax.jit(train).trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()
    for name in ("infllm_v2_tpu_fwd", "infllm_v2_tpu_bwd_dq", "infllm_v2_tpu_bwd_dkdv"):
        assert name in text
    dec = lambda q_, k_, v_: infllm_v2_tpu_decode_kernel(q_, k_, v_, idx[:, :, -1:], count[:, :, -1:],
                                                         t[:, -1:], block_size=BS, num_splits=2, interpret=False)
    text = jax.jit(dec).trace(q[:, -1:], k, v).lower(lowering_platforms=("tpu",)).as_text()
    assert "infllm_v2_tpu_decode" in text
