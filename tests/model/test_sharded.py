"""The model on 8 fake CPU devices (fsdp x tensor mesh) equals the single-device model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import minicpm_jax as mc
from minicpm_jax.sharding import axis_rules, logical_to_spec, make_mesh

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices; conftest sets them")


@pytest.fixture(scope="module")
def setup():
    cfg = mc.ModelConfig.tiny(num_hidden_layers=2, vocab_size=512, tie_word_embeddings=False, sparse_config=None)
    mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    return cfg, mesh


def test_sharded_init_places_parameters_by_logical_axes(setup):
    cfg, mesh = setup
    params = mc.init_params(cfg, jax.random.key(0), mesh=mesh)
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]            # [layers, embed, heads, head_dim]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert params["layers"]["mlp"]["down_proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    assert params["lm_head"].sharding.spec == P("fsdp", "tensor")
    # sharded init produces the same values as single-device init
    single = mc.init_params(cfg, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharded_forward_equals_single_device(setup):
    cfg, mesh = setup
    single = mc.init_params(cfg, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (8, 16)), jnp.int32)
    ref = np.asarray(mc.forward(single, cfg, ids))
    params = mc.init_params(cfg, jax.random.key(0), mesh=mesh)
    with jax.set_mesh(mesh), axis_rules():
        ids_s = jax.device_put(ids, NamedSharding(mesh, logical_to_spec(("batch", "seq"), ids.shape, mesh)))
        out = mc.forward(params, cfg, ids_s)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_load_hf_places_each_tensor_with_its_sharding(setup, tmp_path):
    cfg, mesh = setup
    params = mc.init_params(cfg, jax.random.key(3))
    mc.save_hf(tmp_path / "c", cfg, params)
    _, sharded = mc.load_hf(tmp_path / "c", mesh=mesh)
    k = sharded["layers"]["self_attn"]["k_proj"]["kernel"]
    assert k.sharding.spec == P(None, "fsdp", "tensor", None)
    assert k.addressable_shards[0].data.shape == (2, 64, 1, 64)      # each device holds only its slice
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sharded)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_logical_spec_drops_axes_that_do_not_divide():
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    # 2 KV heads cannot be split 4 ways: replicated on that dim instead of an XLA error
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P("fsdp", None, None)
    assert logical_to_spec(("batch", "seq"), (8, 16), mesh) == P("fsdp", None)
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh({"data": 2, "fsdp": 2, "tensor": 4})
