"""Faithful long-context phases (issue #11, part 2): the shipped config carries the published LongRoPE list; a new phase
takes what its config does not set from its source checkpoint and refuses a mismatch that changes the math, naming it;
`train.init_from_optimizer` continues the source's Adam moments with a new schedule; in training each row chooses
dense or InfLLM v2 on its true length."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import minicpm_jax as mc
from minicpm_jax.checkpoint import Checkpointer, run_paths
from minicpm_jax.rope import longrope_scaling
from minicpm_jax.sharding import axis_rules, make_mesh
from minicpm_jax.sparse import SparseConfig
from minicpm_jax.train.config import OptimConfig, load_config
from minicpm_jax.train.loss import loss_sum_and_count
from minicpm_jax.train.metrics import read_metrics
from minicpm_jax.train.phase import compare_with_source, continue_optimizer, resolve_source_model
from minicpm_jax.train.step import build_step
from tests.train.conftest import MODEL_OVERRIDES, run_cli, train_overrides

# the model of conftest's MODEL_OVERRIDES (head_dim 32: 16 RoPE frequencies)
SMALL = dict(vocab_size=512, num_hidden_layers=2, hidden_size=128, intermediate_size=256, dim_model_base=128.0)


def longrope(first: float, n: int = 16, orig: int = 2048) -> dict:
    f = [first + i for i in range(n)]
    return {"rope_type": "longrope", "short_factor": f, "long_factor": f, "original_max_position_embeddings": orig}


def hf_source(path, **changes):
    cfg = mc.ModelConfig.tiny(**SMALL).replace(**changes)
    mc.save_hf(path, cfg, mc.init_params(cfg, jax.random.key(0)))
    return path


def phase(src, *overrides):
    return load_config(None, [f"train.init_from={src}", *MODEL_OVERRIDES, *overrides])


# ---------------------------------------------------------------- 1. the shipped config


def test_the_long_context_config_carries_the_published_128k_longrope_list():
    exp = load_config("long_context_sparse")
    rs = exp.model_config().rope_scaling
    assert rs is not None and rs.rope_type == "longrope" and rs.original_max_position_embeddings == 32768
    assert rs.long_factor == rs.short_factor and len(rs.long_factor) == 64       # head_dim 128 / 2
    assert rs.long_factor[0] == 0.9977997200264581 and rs.long_factor[-1] == 124.09569231686116
    assert all(a < b for a, b in zip(rs.long_factor, rs.long_factor[1:]))
    assert longrope_scaling(exp.model_config()) == 1.0                           # max_position_embeddings = original
    assert exp.train.init_from_override == ("rope_scaling",)                    # LongRoPE is this phase's choice


# ---------------------------------------------------------------- 2. init_from checks the source


@pytest.fixture(scope="module")
def rope_source(tmp_path_factory):
    """An HF checkpoint with LongRoPE, other μP scalars and another norm eps than the tiny preset."""
    return hf_source(tmp_path_factory.mktemp("src") / "hf", rope_scaling=longrope(1.0), scale_depth=2.0,
                     rms_norm_eps=1e-5, max_position_embeddings=8192)


def test_fields_the_config_does_not_set_come_from_the_source_and_are_recorded(rope_source, tmp_path):
    exp, notes = resolve_source_model(phase(rope_source))
    cfg, src = exp.model_config(), mc.ModelConfig.from_hf_dict(json.loads((rope_source / "config.json").read_text()))
    for f in ("rope_scaling", "scale_depth", "rms_norm_eps", "max_position_embeddings", "rope_theta", "scale_emb"):
        assert getattr(cfg, f) == getattr(src, f), f
    assert cfg.sparse_impl == "xla" and cfg.hidden_size == 128                  # run-time and set fields stay
    assert len(notes) == 1 and all(f in notes[0] for f in ("rope_scaling=longrope", "scale_depth=2.0",
                                                            "rms_norm_eps=1e-05"))
    # the run's recorded config.yaml holds them: the phase's run directory builds the same model without its source
    (tmp_path / "config.yaml").write_text(exp.to_yaml())
    assert load_config(tmp_path / "config.yaml", recorded=True).model_config() == cfg


def test_a_mismatched_rope_scaling_fails_naming_it_with_both_values(rope_source):
    other = longrope(1.0)
    other["short_factor"] = other["long_factor"] = other["long_factor"][:5] + [99.0] * 11
    with pytest.raises(ValueError) as e:
        resolve_source_model(phase(rope_source, f"model.rope_scaling={json.dumps(other)}"))
    msg = str(e.value)
    assert "model.rope_scaling: the source has longrope(" in msg and ", this config longrope(" in msg
    assert "first difference: short_factor[5] 6.0 vs 99.0" in msg
    assert "train.init_from_override=[rope_scaling]" in msg
    exp, notes = resolve_source_model(phase(rope_source, f"model.rope_scaling={json.dumps(other)}",
                                            "train.init_from_override=[rope_scaling]"))
    assert exp.model_config().rope_scaling.short_factor[5] == 99.0 and "init_from_override" in notes[-1]


def test_no_rope_scaling_here_against_longrope_there_needs_an_override(rope_source):
    exp, _ = resolve_source_model(phase(rope_source, "train.init_from_override=[rope_scaling]"))
    assert exp.model_config().rope_scaling is None                               # the preset's plain RoPE, asked for
    src = hf_source(rope_source.parent / "plain", max_position_embeddings=4096)
    with pytest.raises(ValueError, match=r"model.rope_scaling: the source has None \(plain RoPE\), this config "
                                         r"longrope\(original_max_position_embeddings=2048"):
        resolve_source_model(phase(src, f"model.rope_scaling={json.dumps(longrope(1.0))}"))


def test_mup_scalars_and_norm_eps_set_here_must_agree(rope_source):
    with pytest.raises(ValueError) as e:
        resolve_source_model(phase(rope_source, "model.scale_depth=1.4", "model.rms_norm_eps=1e-6",
                                   "model.scale_emb=12"))
    msg = str(e.value)
    assert "model.scale_depth: the source has 2.0, this config 1.4" in msg
    assert "model.rms_norm_eps: the source has 1e-05, this config 1e-06" in msg
    assert "scale_emb" not in msg                                                # equal: no complaint


def test_shapes_set_here_must_agree_and_cannot_be_overridden(rope_source):
    with pytest.raises(ValueError, match="model.num_hidden_layers: the source has 2, this config 3") as e:
        resolve_source_model(phase(rope_source, "model.num_hidden_layers=3"))
    assert "init_from_override" not in str(e.value)                              # no override offered for shapes
    with pytest.raises(ValueError, match="'hidden_size' cannot be overridden"):
        phase(rope_source, "train.init_from_override=[hidden_size]")


def test_max_position_embeddings_counts_only_under_longrope(rope_source):
    with pytest.raises(ValueError, match="model.max_position_embeddings: the source has 8192, this config 16384"):
        resolve_source_model(phase(rope_source, "model.max_position_embeddings=16384"))
    plain = hf_source(rope_source.parent / "plain2", max_position_embeddings=4096)
    exp, _ = resolve_source_model(phase(plain, "model.max_position_embeddings=16384"))   # plain RoPE: no effect
    assert exp.model_config().max_position_embeddings == 16384


def test_sparse_config_comes_from_a_sparse_source_and_is_never_checked():
    own = mc.ModelConfig.tiny(**SMALL)
    sparser = own.replace(sparse_config={"topk": 4})
    assert compare_with_source(own, sparser, set(), ()) == ({"sparse_config": sparser.sparse_config}, [], [])
    assert compare_with_source(own, own.replace(sparse_config=None), set(), ()) == ({}, [], [])   # dense source
    assert compare_with_source(own, sparser, {"sparse_config"}, ()) == ({}, [], [])   # set here: this phase's choice


@pytest.mark.parametrize("overrides,message", [
    (["train.init_from_override=[rope_scalng]"], "unknown field 'rope_scalng'"),
    (["train.init_from_override=[sparse_config]"], "'sparse_config' is not checked against the source"),
])
def test_init_from_override_names_are_validated(rope_source, overrides, message):
    with pytest.raises(ValueError, match=message):
        phase(rope_source, *overrides)


def test_phase_options_need_init_from():
    for o in ("train.init_from_override=[rope_scaling]", "train.init_from_optimizer=true"):
        with pytest.raises(ValueError, match=f"train.{o.split('=')[0][6:]}: only means something with"):
            load_config(None, [o])


def test_init_from_optimizer_from_an_hf_directory_is_refused(rope_source):
    with pytest.raises(ValueError, match="train.init_from_optimizer: .* is an HF checkpoint directory, which holds "
                                         "weights only, no optimizer state"):
        resolve_source_model(phase(rope_source, "train.init_from_optimizer=true"))


# ---------------------------------------------------------------- 3. optimizer continuation


def random_batch(rng, b=2, t=32):
    ids = rng.integers(3, 512, (b, t)).astype(np.int32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    one = np.ones((b, t), np.int32)
    return {"input_ids": ids, "segment_ids": one, "positions": pos, "loss_mask": one}


def one_device_setup(exp):
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    return build_step(exp.model_config(), mesh, (2, 32), optim=exp.optim, total_steps=exp.train.steps)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A training run directory (config.yaml + checkpoint of step 3 after three Adam updates)."""
    run = tmp_path_factory.mktemp("src") / "run"
    exp = load_config(None, [*MODEL_OVERRIDES, f"output_dir={run}", "train.steps=10", "optim.warmup_steps=2",
                             "optim.decay_steps=2"])
    setup = one_device_setup(exp)
    state = setup.init_state(setup.init_params(0))
    rng = np.random.default_rng(0)
    with jax.set_mesh(setup.mesh), axis_rules():
        for _ in range(3):
            state, _ = setup.train_step(state, random_batch(rng))
    run.mkdir(parents=True)
    run_paths(run)["config"].write_text(exp.to_yaml())
    ckpt = Checkpointer(run_paths(run)["checkpoints"], async_save=False)
    ckpt.save(3, state, None, {"step": 3})
    ckpt.close()
    return run, jax.device_get(state)


def test_continuing_the_optimizer_reproduces_the_moments_and_restarts_the_schedule(source_run):
    run, saved = source_run
    exp = load_config(None, [*MODEL_OVERRIDES, f"train.init_from={run}", "train.init_from_optimizer=true",
                             "train.steps=20", "optim.warmup_steps=4", "optim.decay_steps=4", "optim.peak_lr=3e-3"])
    exp, _ = resolve_source_model(exp)
    setup = one_device_setup(exp)
    state, note = continue_optimizer(exp, setup)
    assert f"training run {run}, checkpoint step 3, with its Adam moments after 3 updates" in note
    got, want = jax.device_get(state), saved
    adam = lambda s: s.opt_state[1]
    assert isinstance(adam(got), optax.ScaleByAdamState) and int(adam(got).count) == 3   # bias correction goes on
    for part in ("mu", "nu"):
        for a, b in zip(jax.tree.leaves(getattr(adam(got), part)), jax.tree.leaves(getattr(adam(want), part))):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
        np.testing.assert_array_equal(a, b)
    assert int(got.step) == 0 and int(got.opt_state[-1].count) == 0 and int(want.opt_state[-1].count) == 3
    # the next update uses the new schedule from its start, and the continued moments (not fresh ones)
    fresh = setup.init_state(jax.tree.map(jnp.copy, state.params))     # the step donates `state`
    batch = random_batch(np.random.default_rng(1))
    with jax.set_mesh(setup.mesh), axis_rules():
        cont, m = setup.train_step(state, batch)
        new, _ = setup.train_step(fresh, batch)
    assert m["lr"] == setup.schedule(0) and float(m["lr"]) == 0.0 and int(cont.opt_state[-1].count) == 1
    for c, w, n in zip(*(jax.tree.leaves(jax.device_get(s.opt_state[1].mu)) for s in (cont, want, new))):
        np.testing.assert_allclose(c, 0.9 * w + n, rtol=0, atol=1e-6 * np.abs(c).max())   # b1 = 0.9


def test_continuing_into_another_optimizer_tree_names_the_difference(source_run):
    run, _ = source_run
    exp = load_config(None, [*MODEL_OVERRIDES, f"train.init_from={run}", "train.init_from_optimizer=true",
                             "optim.clip_grad_norm=0"])            # no clipping: the chain is one element shorter
    with pytest.raises(ValueError, match=r"does not have this run's tree \(only the source has \['opt_state.1.count.*"
                                         r"only this run has \['opt_state.0.count"):
        continue_optimizer(exp, one_device_setup(exp))


# ---------------------------------------------------------------- 4. the dense / sparse switch on true length

SPARSE_CFG = mc.ModelConfig.tiny(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=256, dim_model_base=64.0,
                                 sparse_config=SparseConfig(block_size=16, kernel_size=8, kernel_stride=4,
                                                            init_blocks=1, window_size=32, topk=2, dense_len=128))
T, SHORT = 256, 120                 # a 120-token document padded to 256 > dense_len 128, and a full 256-token one


def one_document_rows(lengths, seed=0):
    rng = np.random.default_rng(seed)
    n = np.asarray(lengths)[:, None]
    real = np.arange(T)[None] < n
    return {"input_ids": np.where(real, rng.integers(3, 256, (len(lengths), T)), 0).astype(np.int32),
            "segment_ids": real.astype(np.int32), "positions": np.where(real, np.arange(T)[None], 0).astype(np.int32),
            "loss_mask": real.astype(np.int32)}


@functools.partial(jax.jit, static_argnames="attention")
def loss_and_grads(params, batch, attention):
    return jax.value_and_grad(lambda p: loss_sum_and_count(p, SPARSE_CFG, batch, attention=attention)[0])(params)


def test_a_short_row_padded_past_dense_len_runs_dense_and_a_long_row_sparse():
    params = mc.init_params(SPARSE_CFG, jax.random.key(1))
    both = one_document_rows([SHORT, T])
    row = lambda i: {k: v[i:i + 1] for k, v in both.items()}
    loss, grads = loss_and_grads(params, both, "auto")
    dense_short, g_short = loss_and_grads(params, row(0), "dense")
    sparse_long, g_long = loss_and_grads(params, row(1), "sparse")
    np.testing.assert_allclose(loss, dense_short + sparse_long, rtol=2e-6)
    for g, a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(g_short), jax.tree.leaves(g_long)):
        np.testing.assert_allclose(g, a + b, rtol=1e-4, atol=1e-5 * float(np.abs(a + b).max()))
    # the choice matters: each row's other path gives other gradients (the short row under InfLLM v2 is what its
    # padded length 256 >= dense_len chose before)
    rel = lambda g, h: max(float(np.abs(x - y).max() / np.abs(x).max()) for x, y in zip(jax.tree.leaves(g),
                                                                                       jax.tree.leaves(h)))
    assert rel(g_short, loss_and_grads(params, row(0), "sparse")[1]) > 0.05
    assert rel(g_long, loss_and_grads(params, row(1), "dense")[1]) > 0.05
    # both rows short: the all-dense branch, equal to dense attention on the batch
    short2 = one_document_rows([SHORT, 90], seed=2)
    np.testing.assert_allclose(loss_and_grads(params, short2, "auto")[0], loss_and_grads(params, short2, "dense")[0],
                               rtol=2e-6)


def test_the_train_step_counts_the_rows_that_ran_dense_in_its_flops():
    mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    setup = build_step(SPARSE_CFG, mesh, (2, T), optim=OptimConfig(warmup_steps=1, decay_steps=1), total_steps=4)
    assert setup.plan.per_row and setup.dense_flops_per_token > setup.flops_per_token
    state = setup.init_state(setup.init_params(0))
    with jax.set_mesh(mesh), axis_rules():
        _, m = setup.train_step(state, one_document_rows([SHORT, T]))
    assert int(m["dense_rows"]) == 1 and math.isfinite(float(m["loss"]))
    assert setup.flops_per_step(1) == T * (setup.dense_flops_per_token + setup.flops_per_token)
    assert setup.flops_per_step() == 2 * T * setup.flops_per_token


# ---------------------------------------------------------------- end to end: the CLI phase from a run directory


def test_a_phase_run_continues_the_source_run(source_run, prepared_data_dir, tmp_path):
    run, _ = source_run
    out = tmp_path / "phase"
    r = run_cli(["train", "--config", "experiments/configs/tiny.yaml"] + train_overrides(
        out, prepared_data_dir, 2, [f"train.init_from={run}", "train.init_from_optimizer=true",
                                    "optim.warmup_steps=1", "optim.decay_steps=1"]))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "checkpoint step 3, with its Adam moments after 3 updates" in r.stdout
    rows = [x for x in read_metrics(out) if x["split"] == "train"]
    assert [x["step"] for x in rows] == [1, 2] and rows[0]["lr"] == 0.0       # the new warmup starts at 0
    bad = run_cli(["train", "--config", "experiments/configs/tiny.yaml"] + train_overrides(
        tmp_path / "bad", prepared_data_dir, 4, [f"train.init_from={run}", "model.scale_depth=2.0"]))
    assert bad.returncode == 2 and "model.scale_depth: the source has 1.4, this config 2.0" in bad.stderr
