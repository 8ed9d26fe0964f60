"""InfLLM v2 inside the model on a mesh of 8 fake devices: equal to one device, and no more all-gathers than dense.

Meshes: fsdp = 8 (rows split 8 ways) and fsdp 2 x tensor 4 with the tiny model's 2 KV heads (the tensor axis cannot
split KV groups, so the sparse path moves rows onto it instead: `sharding.attention_layout`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import minicpm_jax as mc
from minicpm_jax.sharding import axis_rules, logical_to_spec, make_mesh, attention_layout
from minicpm_jax.train.collectives import collective_bytes
from minicpm_jax.train.loss import loss_sum_and_count
from minicpm_jax.train.step import build_step

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices; conftest sets them")

MESHES = {"fsdp8": {"fsdp": 8}, "fsdp2_tensor4": {"fsdp": 2, "tensor": 4}}
B, T = 8, 128


def tiny(impl):
    # sparse from the first token: 8 blocks of 16, top-k 3 + 1 local block, so selection really chooses
    return mc.ModelConfig.tiny(num_hidden_layers=2, vocab_size=512, sparse_impl=impl,
                               sparse_config={"dense_len": 0, "window_size": 16, "topk": 3})


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 512, (B, T))
    seg = np.ones((B, T), np.int32)
    seg[1, 100:] = 0   # rows of different lengths (one document each, then padding)
    seg[5, 37:] = 0
    return {"input_ids": jnp.asarray(ids, jnp.int32), "segment_ids": jnp.asarray(seg),
            "positions": jnp.asarray(np.broadcast_to(np.arange(T), (B, T)), jnp.int32),
            "loss_mask": jnp.asarray(seg)}


def loss_and_grads(cfg, params, b):
    def f(p):
        s, n = loss_sum_and_count(p, cfg, b, attention="sparse")
        return s / n
    return jax.jit(jax.value_and_grad(f))(params)


def test_layout_never_splits_a_kv_group():
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    assert attention_layout(8, 4, 2, mesh)[1:] == (("fsdp", "tensor"), (), ())   # 2 groups on 4: rows instead
    assert attention_layout(8, 8, 4, mesh)[1:] == (("fsdp",), ("tensor",), ("tensor",))  # whole groups over tensor
    assert attention_layout(2, 4, 2, mesh)[1:] == (("fsdp",), (), ())            # neither divides: replicated
    assert attention_layout(8, 4, 2, make_mesh({"fsdp": 8}))[1:] == (("fsdp",), (), ())
    assert attention_layout(8, 4, 2, make_mesh({"fsdp": 1}, devices=jax.devices()[:1])) is None
    # dense attention may split a group: 32 query heads of 2 groups over 4 devices, each device within one group
    dense = attention_layout(8, 32, 2, mesh, split_groups=True)
    assert dense[1:] == (("fsdp",), ("tensor",), ()) and dense.splits_groups


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_sharded_sparse_loss_and_grads_equal_one_device(impl, mesh_name):
    cfg = tiny(impl)
    params = mc.init_params(cfg, jax.random.key(0))
    b = batch()
    loss1, g1 = loss_and_grads(cfg, params, b)
    mesh = make_mesh(MESHES[mesh_name])
    ps = mc.init_params(cfg, jax.random.key(0), mesh=mesh)
    with jax.set_mesh(mesh), axis_rules():
        bs = {k: jax.device_put(v, NamedSharding(mesh, logical_to_spec(("batch", "seq"), v.shape, mesh)))
              for k, v in b.items()}
        loss8, g8 = loss_and_grads(cfg, ps, bs)
    np.testing.assert_allclose(float(loss8), float(loss1), rtol=1e-5)
    for (path, a), c in zip(jax.tree_util.tree_leaves_with_path(g8), jax.tree.leaves(g1)):
        scale = float(np.abs(np.asarray(c)).max()) or 1.0
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=2e-5 * scale, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def gathered(cfg, mesh_shape, attention):
    mesh = make_mesh(mesh_shape)
    setup = build_step(cfg, mesh, (B, T), attention=attention)
    with jax.set_mesh(mesh), axis_rules():
        text = setup.train_step.lower(setup.abstract_state(), setup.abstract_batch()).compile().as_text()
    return collective_bytes(text), text


@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_sparse_step_gathers_no_more_than_dense(impl, mesh_name):
    cfg = tiny(impl)
    dense, _ = gathered(cfg, MESHES[mesh_name], "dense")
    sparse, text = gathered(cfg, MESHES[mesh_name], "sparse")
    assert "shard_map" in text                                           # the model handed its mesh down
    assert dense["all-gather"] > 0                                       # FSDP weights: the counter sees gathers
    assert sparse["all-gather"] <= dense["all-gather"], (sparse, dense)


def test_collective_bytes_reads_hlo():
    text = "\n".join([
        "  %ag = f32[8,256]{1,0} all-gather(f32[1,256]{1,0} %x), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}",
        "  %ar = (f32[4,2]{1,0}, bf16[3]{0}) all-reduce(%a, %b), replica_groups={{0,1},{2,3}}, to_apply=%add",
        "  %noop = f32[1000]{0} all-reduce(%c), replica_groups={{0},{1},{2},{3}}, to_apply=%add",
        "  %s = (f32[2]{0}, f32[16]{0}) all-gather-start(f32[2]{0} %y), replica_groups={{0,1,2,3,4,5,6,7}}",
        "  %d = f32[16]{0} all-gather-done(%s)",
    ])
    got = collective_bytes(text)
    assert got["all-gather"] == 8 * 256 * 4 + 16 * 4 and got["all-reduce"] == 4 * 2 * 4 + 3 * 2


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_sharded_decode_equals_one_device(impl):
    scfg = tiny(impl).sparse_config
    rng = np.random.default_rng(1)
    b, s, hq, hkv, d = 4, 200, 8, 4, 16
    q = jnp.asarray(rng.standard_normal((b, 1, hq, d)), jnp.float32)
    kc, vc = (jnp.asarray(rng.standard_normal((b, s, hkv, d)), jnp.float32) for _ in range(2))
    lengths = jnp.asarray([200, 131, 64, 17], jnp.int32)
    cc = mc.sparse.compressed_cache_from_keys(kc, lengths, scfg)
    want = mc.sparse.infllm_v2_decode(q, kc, vc, lengths, cc, scfg, impl=impl)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    layout = attention_layout(b, hq, hkv, mesh)
    assert layout.batch_axes == ("fsdp",) and layout.head_axes == ("tensor",)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    x = P("fsdp", None, "tensor", None)
    cc_s = jax.tree.map(lambda a: put(a, x if a.ndim == 4 else P("fsdp")), cc)
    with jax.set_mesh(mesh):
        got = mc.sparse.infllm_v2_decode(put(q, x), put(kc, x), put(vc, x), put(lengths, P("fsdp")), cc_s, scfg,
                                         impl=impl, mesh=mesh, batch_axes=layout.batch_axes,
                                         head_axes=layout.head_axes)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_collective_bytes_counts_loop_bodies_per_trip():
    text = "\n".join([
        "HloModule m, entry_computation_layout={(f32[2]{0})->f32[2]{0}}",
        "%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {",
        "  %ag = f32[32]{0} all-gather(f32[4]{0} %x), replica_groups=[1,8]<=[8], dimensions={0}",
        "}",
        "%cond (p: (s32[], f32[4])) -> pred[] {",
        "  ROOT %lt = pred[] compare(%i, %n), direction=LT",
        "}",
        "%branch (p: f32[4]) -> f32[4] {",
        "  %ar = f32[4]{0} all-reduce(%p), replica_groups={{0,1}}, to_apply=%add",
        "}",
        "ENTRY %main (a: f32[2]) -> f32[2] {",
        '  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"32"}}',
        "  %c = f32[4] conditional(%i, %a, %a), branch_computations={%branch, %branch}",
        "  %ag2 = f32[16]{0} all-gather(f32[2]{0} %a), replica_groups=[1,8]<=[8], dimensions={0}",
        "}",
    ])
    got = collective_bytes(text)
    assert got["all-gather"] == 32 * 32 * 4 + 16 * 4 and got["all-reduce"] == 4 * 4
