"""Pallas kernels in interpret mode: each against its plain-JAX reference, and end to end against the reference.

Shapes are tiny: interpret mode runs every grid program in a Python-free but sequential loop. The same kernels are
also lowered for the CUDA platform (Triton IR) here, which needs no GPU and catches unsupported ops and shapes.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.sparse import infllm_v2_attention, select_blocks
from minicpm_jax.sparse.select import query_positions, select_block_lists
from pallas_kernels.infllm_v2_bwd import infllm_v2_attention_pallas, infllm_v2_vjp_reference, transposed_map
from pallas_kernels.infllm_v2_decode import infllm_v2_decode_kernel, infllm_v2_decode_reference
from pallas_kernels.infllm_v2_fwd import infllm_v2_fwd, infllm_v2_fwd_reference
from sparse_helpers import SMALL, assert_matches, rel_err, unambiguous

BS = SMALL.block_size


def _lists(q, k, cfg=SMALL, q_offset=None):
    lists = select_block_lists(q, k, cfg, q_offset=q_offset)
    return lists, query_positions(q.shape[0], q.shape[1], k.shape[1], q_offset)


@pytest.mark.parametrize("hq,hkv,min_rows", [(4, 2, None), (3, 1, 8)])  # no padding; G=3 padded to 8 rows
def test_fwd_kernel_matches_its_reference(hq, hkv, min_rows):
    ks = jax.random.split(jax.random.key(hq), 3)
    q = jax.random.normal(ks[0], (2, 45, hq, 16))
    k = jax.random.normal(ks[1], (2, 45, hkv, 16))
    v = jax.random.normal(ks[2], (2, 45, hkv, 16))
    lists, t = _lists(q, k)  # any block lists will do: the kernel must follow them exactly
    o, lse = jax.jit(lambda *a: infllm_v2_fwd(*a, block_size=BS, interpret=True, min_rows=min_rows))(
        q, k, v, lists.idx, lists.count, t)
    o_r, lse_r = infllm_v2_fwd_reference(q, k, v, lists.idx, lists.count, t, block_size=BS)
    assert rel_err(o, o_r) < 1e-5
    assert rel_err(lse, lse_r) < 1e-5


def test_bwd_kernels_match_reference_vjp():
    ks = jax.random.split(jax.random.key(7), 4)
    q = jax.random.normal(ks[0], (1, 50, 4, 16))
    k = jax.random.normal(ks[1], (1, 50, 2, 16))
    v = jax.random.normal(ks[2], (1, 50, 2, 16))
    do = jax.random.normal(ks[3], q.shape)
    lists, t = _lists(q, k)
    f = lambda q_, k_, v_: infllm_v2_attention_pallas(q_, k_, v_, lists.idx, lists.count, t, block_size=BS,
                                                      interpret=True)
    got = jax.jit(lambda a, b, c: jax.vjp(f, a, b, c)[1](do))(q, k, v)
    want = infllm_v2_vjp_reference(q, k, v, lists.idx, lists.count, t, do, block_size=BS)
    for name, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < 1e-5, name


def test_transposed_map_lists_every_chunk_that_selected_a_block():
    idx = jnp.array([[[[0, 2], [1, 1], [2, 0], [0, 0]]]])  # [1,1,4,2]
    count = jnp.array([[[2, 1, 1, 2]]])
    qchunks, qcount = transposed_map(idx, count, 3, 2)      # chunks {t0,t1}, {t2,t3}
    assert qcount.tolist() == [[[2, 1, 2]]]
    assert qchunks[0, 0, 0, :2].tolist() == [0, 1] and qchunks[0, 0, 1, 0] == 0 and qchunks[0, 0, 2].tolist() == [0, 1]


@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2), (8, 1), (16, 1)])
def test_pallas_end_to_end_matches_reference(hq, hkv):
    q, k, v = unambiguous(1, 83, hq, hkv, 16, SMALL, seed=2)  # 83: not a multiple of block or kernel size
    ref = lambda q_, k_, v_: infllm_v2_attention(q_, k_, v_, SMALL, "reference")
    pal = lambda q_, k_, v_: infllm_v2_attention(q_, k_, v_, SMALL, "pallas", interpret=True)
    assert_matches(pal, ref, q, k, v)


@pytest.mark.parametrize("num_splits", [3])  # 3 splits of the block list, merged by log-sum-exp
def test_decode_kernel_matches_its_reference(num_splits):
    ks = jax.random.split(jax.random.key(3), 4)
    s = 90  # cache capacity: not a multiple of the block size (partial last block read in place)
    k = jax.random.normal(ks[1], (3, s, 2, 16))
    v = jax.random.normal(ks[2], (3, s, 2, 16))
    q = jax.random.normal(ks[0], (3, 1, 8, 16))
    lengths = jnp.array([90, 61, 17])
    lists, _ = _lists(q, k, q_offset=lengths - 1)
    t = (lengths - 1)[:, None]
    o = jax.jit(lambda *a: infllm_v2_decode_kernel(*a, block_size=BS, num_splits=num_splits, interpret=True))(
        q, k, v, lists.idx, lists.count, t)
    o_r = infllm_v2_decode_reference(q, k, v, lists.idx, lists.count, t, block_size=BS)
    assert rel_err(o, o_r) < 1e-5


def test_kernels_lower_to_triton_for_cuda():
    """Lowering for the CUDA platform runs the Pallas->Triton-IR lowering without a GPU."""
    q, k, v = unambiguous(1, 64, 4, 2, 16, SMALL)
    lists, t = _lists(q, k)
    do = jnp.ones_like(q)

    def train(q_, k_, v_):
        f = lambda a, b, c: infllm_v2_attention_pallas(a, b, c, lists.idx, lists.count, t, block_size=BS,
                                                       interpret=False)
        o, vjp = jax.vjp(f, q_, k_, v_)
        return o, vjp(do)

    text = jax.jit(train).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
    for name in ("infllm_v2_fwd", "infllm_v2_bwd_dq", "infllm_v2_bwd_dkdv"):
        assert name in text
    dec = lambda q_, k_, v_: infllm_v2_decode_kernel(q_, k_, v_, lists.idx[:, :, -1:], lists.count[:, :, -1:],
                                                      t[:, -1:], block_size=BS, num_splits=2, interpret=False)
    text = jax.jit(dec).trace(q[:, -1:], k, v).lower(lowering_platforms=("cuda",)).as_text()
    assert "infllm_v2_decode" in text


_SHARD_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from minicpm_jax.sparse import infllm_v2_attention
from sparse_helpers import SMALL, unambiguous, rel_err
mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
q, k, v = unambiguous(2, 48, 4, 2, 16, SMALL)
ref = infllm_v2_attention(q, k, v, SMALL, "reference")
sh = NamedSharding(mesh, P("data", None, "tensor", None))
qs, kss, vs = (jax.device_put(x, sh) for x in (q, k, v))
f = lambda a, b, c: infllm_v2_attention(a, b, c, SMALL, "pallas", interpret=True, mesh=mesh, batch_axes="data",
                                        head_axes="tensor")
out = jax.jit(f)(qs, kss, vs)
g = jax.jit(jax.grad(lambda a, b, c: f(a, b, c).sum(), (0, 1, 2)))(qs, kss, vs)
g_ref = jax.grad(lambda a, b, c: infllm_v2_attention(a, b, c, SMALL, "reference").sum(), (0, 1, 2))(q, k, v)
assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
assert all(rel_err(a, b) < 1e-4 for a, b in zip(g, g_ref))
print("OK", out.sharding.spec)
"""


def test_pallas_under_shard_map_on_4_fake_devices():
    here = os.path.dirname(__file__)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.abspath(os.path.join(here, "..", "..")), here]))
    r = subprocess.run([sys.executable, "-c", _SHARD_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
