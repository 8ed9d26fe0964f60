"""One train step on 8 fake devices (fsdp x tensor) equals one device; k micro-batches equal one big batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minicpm_jax as mc
from minicpm_jax.sharding import axis_rules, make_mesh
from minicpm_jax.train.config import OptimConfig
from minicpm_jax.train.optimizer import make_optimizer
from minicpm_jax.train.step import TrainState, jit_train_step, make_train_step, state_shardings

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="conftest provides 8 fake CPU devices")

CFG = mc.ModelConfig.tiny(num_hidden_layers=2, vocab_size=512, sparse_config=None, tie_word_embeddings=False)


def packed_batch(b=8, t=32, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 512, (b, t)).astype(np.int32)
    cut = rng.integers(5, t - 5, b)
    seg = np.where(np.arange(t)[None] < cut[:, None], 1, 2).astype(np.int32)
    seg[:, -3:] = 0                                                     # padding
    pos = np.where(seg == 1, np.arange(t)[None], np.arange(t)[None] - cut[:, None]).astype(np.int32)
    mask = (rng.random((b, t)) > 0.2).astype(np.int32)                  # SFT-like partial loss mask
    return {"input_ids": ids, "segment_ids": seg, "positions": np.maximum(pos, 0), "loss_mask": mask}


def one_step(mesh_shape, micro=1, batch=None):
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:np.prod(list(mesh_shape.values()))])
    ap = mc.abstract_params(CFG)
    tx, sched = make_optimizer(OptimConfig(warmup_steps=0, decay_steps=0, eps=ADAM_EPS), CFG, ap, 10)
    sh = state_shardings(mesh, ap, mc.param_logical_axes(CFG), tx)
    params = mc.init_params(CFG, jax.random.key(0), mesh=mesh)
    state = TrainState(jnp.int32(0), params, jax.jit(tx.init, out_shardings=sh.opt_state)(params))
    batch = batch or packed_batch()
    step = jit_train_step(make_train_step(CFG, tx, sched, micro_batches=micro), mesh, sh,
                          batch["input_ids"].shape)
    with jax.set_mesh(mesh), axis_rules():
        state, m = step(state, batch)
    return jax.device_get(state.params), {k: float(v) for k, v in m.items()}


def grads_on(mesh_shape, batch):
    from minicpm_jax.train.loss import loss_sum_and_count
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:np.prod(list(mesh_shape.values()))])
    params = mc.init_params(CFG, jax.random.key(0), mesh=mesh)
    with jax.set_mesh(mesh), axis_rules():
        g = jax.jit(jax.grad(lambda p: loss_sum_and_count(p, CFG, batch)[0]))(params)
    return jax.device_get(g)


def assert_params_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() <= atol


# Tolerances. Gradients: 1e-4 of each tensor's largest entry (float32 reassociation across shards). Updated params:
# 0.1 % of one learning-rate step (lr = 1e-2). Adam's first update is lr * g / (|g| + eps): with the usual eps = 1e-8
# it is about ±lr for gradients that are float32 noise (sums that cancel to ~1e-8), so shard-order noise would flip
# whole steps; eps = 1e-3 keeps the update Lipschitz in g (|d update| <= lr |d g| / eps) while still exercising the
# sharded optimizer state and update.
ADAM_EPS = 1e-3
LR_STEP_TOL = 1e-3 * 1e-2


def test_eight_devices_equal_one_device():
    batch = packed_batch()
    g1, g8 = grads_on({"data": 1, "fsdp": 1, "tensor": 1}, batch), grads_on({"data": 1, "fsdp": 4, "tensor": 2}, batch)
    for x, y in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
        assert np.abs(np.asarray(x) - np.asarray(y)).max() <= 1e-4 * np.abs(np.asarray(y)).max()
    p1, m1 = one_step({"data": 1, "fsdp": 1, "tensor": 1}, batch=batch)
    p8, m8 = one_step({"data": 1, "fsdp": 4, "tensor": 2}, batch=batch)
    assert m1["loss"] == pytest.approx(m8["loss"], rel=1e-6)
    assert m1["grad_norm"] == pytest.approx(m8["grad_norm"], rel=1e-5)
    assert m1["target_tokens"] == m8["target_tokens"]
    assert_params_close(p8, p1, LR_STEP_TOL)


def test_gradient_accumulation_equals_one_big_batch():
    p1, m1 = one_step({"data": 1, "fsdp": 2, "tensor": 1}, micro=1)
    p4, m4 = one_step({"data": 1, "fsdp": 2, "tensor": 1}, micro=4)
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-6)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-5)
    assert_params_close(p4, p1, LR_STEP_TOL)
