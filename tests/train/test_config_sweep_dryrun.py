"""Experiment configs (YAML + overrides, errors naming the key), sweep expansion, and the AOT dry run."""

import jax
import pytest

from minicpm_jax.train.config import load_config
from minicpm_jax.train.sweep import command, expand, load_sweep

REPO_CONFIGS = ["tiny", "minicpm4_0p5b", "minicpm4_8b", "long_context_sparse", "long_context_sparse_tiny", "sft",
                "bitcpm_qat", "data/ev_base", "data/ev_anneal_default", "data/ev_anneal_candidate", "data/sft"]


@pytest.mark.parametrize("name", REPO_CONFIGS)
def test_every_shipped_config_loads_and_builds_its_model(name):
    exp = load_config(f"experiments/configs/{name}.yaml")
    cfg = exp.model_config()
    exp.data
    assert exp.name and cfg.param_count() > 0


def test_overrides_and_errors_name_the_key(tmp_path):
    exp = load_config("experiments/configs/tiny.yaml", ["optim.peak_lr=3e-3", "model.num_hidden_layers=2",
                                                        "train.steps=80", "data.seq_len=128"])
    assert exp.optim.peak_lr == 3e-3 and exp.model_config().num_hidden_layers == 2
    assert exp.data.seq_len == 128 and exp.output_dir == "runs/tiny"
    with pytest.raises(ValueError, match="optim.peak_lrr"):
        load_config(None, ["optim.peak_lrr=1"])
    with pytest.raises(ValueError, match="train.steps"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ValueError, match="optim.decay_shape"):
        load_config(None, ["optim.decay_shape=step"])
    with pytest.raises(ValueError, match="warmup_steps .* exceed"):
        load_config(None, ["train.steps=10", "optim.warmup_steps=8", "optim.decay_steps=8"])
    with pytest.raises(ValueError, match="num_key_value_heads"):
        load_config(None, ["model.num_key_value_heads=3"]).model_config()
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2]\n")
    with pytest.raises(ValueError, match=f"{bad}.*train.steps"):
        load_config(bad)


def test_sweep_expands_the_grid_and_emits_commands(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: demo\nbase: experiments/configs/tiny.yaml\noverrides: [train.steps=60]\n"
                 "grid:\n  model.attention: [dense, sparse]\n  optim.peak_lr: [0.003, 0.01, 0.03]\n")
    spec = load_sweep(f)
    points = expand(spec)
    assert len(points) == 6 and len({p["output_dir"] for p in points}) == 6
    cmd = command(spec, points[4])
    assert cmd[-5:-1] == ["train.steps=60", "model.attention=sparse", "optim.peak_lr=0.01", "name=demo-004"]
    for p in points:                                   # every point is a valid experiment config
        load_config(spec["base"], p["overrides"])
    f.write_text("grid: {}\n")
    with pytest.raises(ValueError, match="grid"):
        load_sweep(f)


def test_sweep_bundles_set_keys_together_and_exclude_drops_points(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: demo\nbase: experiments/configs/tiny.yaml\ngrid:\n"
                 "  width:\n    - {_label: 128, model.hidden_size: 128, model.num_attention_heads: 2}\n"
                 "    - {model.hidden_size: 512, model.num_attention_heads: 8}\n"
                 "  param:\n    - {_label: mup, optim.mup: true}\n"
                 "    - {_label: sp, optim.mup: false, model.dim_model_base: '${model.hidden_size}'}\n"
                 "exclude:\n  - {width: 128, param: sp}\n")
    points = expand(load_sweep(f))
    assert [p["values"] for p in points] == [{"width": 128, "param": "mup"}, {"width": "512-8", "param": "mup"},
                                             {"width": "512-8", "param": "sp"}]
    assert points[2]["name"] == "003_width=512-8_param=sp"          # names keep the full grid's index
    exp = load_config("experiments/configs/tiny.yaml", points[2]["overrides"])
    cfg = exp.model_config()
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.width_mult, exp.optim.mup) == (512, 8, 1.0, False)
    f.write_text("grid:\n  width: [{model.hidden_size: 128}, 256]\n")
    with pytest.raises(ValueError, match="mixes bundles"):
        load_sweep(f)
    f.write_text("grid:\n  optim.peak_lr: [0.01]\nexclude: [{optim.lr: 0.01}]\n")
    with pytest.raises(ValueError, match="not in the grid"):
        load_sweep(f)


def test_emitted_commands_with_a_launcher_template(tmp_path, capsys):
    import shlex
    from minicpm_jax.train.sweep import run_sweep
    f = tmp_path / "s.yaml"
    f.write_text("name: demo\nbase: experiments/configs/tiny.yaml\ngrid:\n  optim.peak_lr: [0.003, 0.01]\n")
    run_sweep(f, emit_commands=True, launcher="sbatch --wrap {}")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    argv = shlex.split(lines[1])
    assert argv[:2] == ["sbatch", "--wrap"] and len(argv) == 3 and "optim.peak_lr=0.01" in argv[2]
    run_sweep(f, emit_commands=True, launcher="srun")
    assert capsys.readouterr().out.splitlines()[0].startswith("srun ")


def test_shipped_sweeps_expand():
    import glob
    files = glob.glob("experiments/sweeps/*.yaml")
    assert files
    for f in files:
        spec = load_sweep(f)
        for p in expand(spec):
            load_config(spec.get("base"), p["overrides"])


@pytest.mark.skipif(len(jax.devices()) < 8, reason="conftest provides 8 fake CPU devices")
def test_dry_run_compiles_the_sharded_step_and_reports_memory(capsys):
    from minicpm_jax.train.dry_run import dry_run
    exp = load_config("experiments/configs/tiny.yaml", ["mesh.fsdp=4", "mesh.tensor=2", "data.batch_size=8",
                                                        "train.micro_batches=2", "model.remat_policy=full"])
    report = dry_run(exp)
    out = capsys.readouterr().out
    assert report["devices"] == 8 and report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert report["peak_bytes_per_device"] > report["argument_bytes"] / 2 > 0
    assert "temp_bytes" in out and "GiB" in out
