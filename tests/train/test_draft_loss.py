"""The EAGLE draft head's training loss: its terms against numpy, document boundaries in packed rows, and that a few
hundred Adam steps on a frozen target make the draft's proposals accepted more often by speculative decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import minicpm_jax as mc
from minicpm_jax.speculative import init_draft, speculative_generate
from minicpm_jax.train.draft_loss import draft_loss_sum, make_draft_train_step, smooth_l1, soft_cross_entropy
from minicpm_jax.train.step import TrainState


def test_loss_terms_match_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 5, 8)) * 2, rng.normal(size=(3, 5, 8))
    d = np.abs(x - y)
    want = np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean(-1)
    np.testing.assert_allclose(smooth_l1(jnp.asarray(x), jnp.asarray(y)), want, rtol=1e-5)
    a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    pb = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
    la = a - np.log(np.exp(a).sum(-1, keepdims=True))
    np.testing.assert_allclose(soft_cross_entropy(jnp.asarray(a), jnp.asarray(b)), -(pb * la).sum(-1), rtol=1e-5)


@pytest.fixture(scope="module")
def target():
    cfg = mc.ModelConfig.tiny(num_hidden_layers=2, vocab_size=300, sparse_config=None)
    return cfg, mc.init_params(cfg, jax.random.key(1))


def batch_of(ids, seg=None, pos=None):
    ids = jnp.asarray(ids, jnp.int32)
    seg = jnp.ones_like(ids) if seg is None else jnp.asarray(seg, jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape) if pos is None else \
        jnp.asarray(pos, jnp.int32)
    return {"input_ids": ids, "segment_ids": seg, "positions": pos}


def test_packed_row_equals_its_documents_alone(target):
    """Two documents packed in one row: the same loss as each in its own row (no pair crosses the boundary and the
    draft's attention stays inside each document), and padding adds nothing."""
    cfg, params = target
    draft = init_draft(cfg, np.arange(0, 300, 3), jax.random.key(2))
    rng = np.random.default_rng(1)
    a, b = rng.integers(3, 300, 11), rng.integers(3, 300, 7)
    packed = batch_of([np.concatenate([a, b, [0, 0]])], [[1] * 11 + [2] * 7 + [0, 0]],
                      [list(range(11)) + list(range(7)) + [0, 0]])
    loss = lambda bt: draft_loss_sum(draft.params, params, cfg, draft.cfg, draft.fr_ids, bt)
    tot, n, aux = loss(packed)
    ta, na, _ = loss(batch_of([a]))
    tb, nb, _ = loss(batch_of([b]))
    assert float(n) == float(na + nb) == 10 + 6
    np.testing.assert_allclose(float(tot), float(ta + tb), rtol=1e-4)
    assert 0 <= float(aux["fr_top1"]) <= float(n)


def test_training_makes_proposals_accepted(target):
    """Train the head on the target's own greedy continuations (what it will be asked to predict) and check that
    the loss falls, first-token agreement rises and speculative decoding keeps more drafted tokens per target
    pass than with the untrained head, with the output still exactly greedy's."""
    cfg, params = target
    fr = np.arange(300)
    # 96 sequences: with fewer the head memorises their tokens instead of learning the target's habits
    prompts = np.random.default_rng(2).integers(3, 300, (96, 8))
    text = mc.generate(params, cfg, prompts, 40, eos_token_id=[]).tokens
    data = np.concatenate([prompts, text], axis=1)                          # [96, 48]
    draft0 = init_draft(cfg, fr, jax.random.key(3))
    tx = optax.adam(3e-3)
    step = jax.jit(make_draft_train_step(cfg, draft0.cfg, draft0.fr_ids, tx))
    state = TrainState(step=jnp.int32(0), params=draft0.params, opt_state=tx.init(draft0.params))
    first = None
    for i in range(200):
        rows = np.random.default_rng(i).choice(96, 16, replace=False)
        state, m = step(state, params, batch_of(data[rows]))
        first = first or {k: float(v) for k, v in m.items()}
    last = {k: float(v) for k, v in m.items()}
    print("draft training first/last:", first, last)
    assert last["loss"] < 0.5 * first["loss"]
    assert last["fr_top1"] > first["fr_top1"] + 0.2
    trained = draft0._replace(params=state.params)
    test_prompts = [list(p) for p in np.random.default_rng(5).integers(3, 300, (6, 8))]   # not trained on
    ref = mc.generate(params, cfg, test_prompts, 24, eos_token_id=[])
    r0 = speculative_generate(params, cfg, draft0, test_prompts, 24, k=3, eos_token_id=[])
    r1 = speculative_generate(params, cfg, trained, test_prompts, 24, k=3, eos_token_id=[])
    assert r1.sequences() == ref.sequences() == r0.sequences()
    per_pass = lambda r: float((r.accepted + r.target_passes).sum() / r.target_passes.sum())
    print("tokens per target pass: untrained", per_pass(r0), "trained", per_pass(r1))
    assert per_pass(r0) < 1.05 and per_pass(r1) > 1.15
