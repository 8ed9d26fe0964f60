"""Kill-and-resume: a run killed during a checkpoint save resumes from the previous checkpoint and reproduces the
uninterrupted loss sequence exactly; corrupt checkpoints are detected with a message naming them."""

import shutil

import pytest

from minicpm_jax.checkpoint import CheckpointError
from minicpm_jax.weights import load_weights
from minicpm_jax.train.metrics import read_metrics
from tests.train.conftest import run_cli, train_overrides

CONFIG = ["train", "--config", "experiments/configs/tiny.yaml"]


def losses(run_dir) -> dict[int, float]:
    out = {}
    for r in read_metrics(run_dir):          # a resumed run re-logs steps after its checkpoint: later rows win
        if r["split"] == "train":
            out[r["step"]] = r["loss"]
    return out


@pytest.fixture(scope="module")
def uninterrupted(prepared_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    r = run_cli(CONFIG + train_overrides(out, prepared_data_dir, 6, ["train.checkpoint_every=2",
                                                                    "train.profile_steps=[3]"]))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert list((out / "profile").rglob("*.xplane.pb")), "jax.profiler trace of step 3 missing"
    (out.parent / "a.stdout").write_text(r.stdout)        # what a log file of the run holds (not a terminal)
    (out.parent / "a.stderr").write_text(r.stderr)
    return out


def test_logs_are_plain_lines_when_not_on_a_terminal(uninterrupted):
    """Redirected output gets one plain line per logged step, no progress-bar redraws (carriage returns, cursor
    moves), and every step after the first logged interval reports its throughput, eval/checkpoint steps included."""
    out, err = (uninterrupted.parent / "a.stdout").read_text(), (uninterrupted.parent / "a.stderr").read_text()
    assert "\r" not in out + err and "\x1b[" not in out + err
    lines = [ln for ln in out.splitlines() if ln.startswith("step ") and ": loss " in ln]
    assert [ln.split(":")[0] for ln in lines] == [f"step {i}/6" for i in range(1, 7)], out[-2000:]
    assert "tok/s —" in lines[0] and all("tok/s —" not in ln and "tok/s 0," not in ln for ln in lines[1:]), lines
    rows = [r for r in read_metrics(uninterrupted) if r["split"] == "train"]
    assert all(r["tokens_per_s"] > 0 for r in rows[1:]), rows    # steps 3 and 5 follow checkpoints (every 2)


def test_kill_during_save_then_resume_reproduces_the_loss_sequence(uninterrupted, prepared_data_dir, tmp_path):
    out = tmp_path / "b"
    args = CONFIG + train_overrides(out, prepared_data_dir, 6, ["train.checkpoint_every=2"])
    killed = run_cli(args, {"MINICPM_FAULT": "during_save:4"})
    assert killed.returncode == 17, killed.stdout[-2000:] + killed.stderr[-2000:]
    committed = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert committed == [2], committed             # step 4 never committed
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "checkpoints/2" in resumed.stdout
    a, b = losses(uninterrupted), losses(out)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert [b[s] for s in range(1, 7)] == [a[s] for s in range(1, 7)]    # bit-identical


def test_corrupt_checkpoint_is_named_and_the_previous_one_is_used(uninterrupted, tmp_path, capsys):
    run = tmp_path / "copy"
    shutil.copytree(uninterrupted, run)
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6]                          # keep_checkpoints = 2
    # truncate every array file of step 6 (the largest alone may hold only optimizer moments, which a params-only
    # restore never reads)
    for victim in (run / "checkpoints" / "6" / "state").rglob("*"):
        if victim.is_file() and victim.stat().st_size > 4096:
            victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    with pytest.raises(CheckpointError, match=r"checkpoint step 6 in .*checkpoints cannot be restored.*partial or "
                                              r"corrupt"):
        load_weights(run, step=6)
    w = load_weights(run)                           # falls back to step 4, with a warning
    assert "Falling back to the previous checkpoint" in capsys.readouterr().out and w.step == 4
    params, params4 = w.params, load_weights(uninterrupted, step=4).params
    import jax
    import numpy as np
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params4)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_training_run_exports_to_gguf_and_hf(uninterrupted, tmp_path):
    """The exporter reads the orbax run (config.yaml + checkpoints + tokenizer) and llama.cpp runs the result."""
    from tests.train.conftest import run_cli
    w = load_weights(uninterrupted)
    cfg, params, tok = w.cfg, w.params, w.tokenizer
    assert cfg.num_hidden_layers == 2 and tok is not None and tok.vocab_size <= cfg.vocab_size
    r = run_cli(["export", "--checkpoint", str(uninterrupted), "--format", "gguf", "--qtype", "f32", "--out",
                 str(tmp_path / "m.gguf")])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    g = run_cli(["generate", "--gguf", str(tmp_path / "m.gguf"), "--prompt", "The history of",
                 "--max-new-tokens", "8"])
    assert g.returncode == 0 and g.stdout.strip(), g.stdout[-2000:] + g.stderr[-2000:]
    j = run_cli(["generate", "--checkpoint", str(uninterrupted), "--prompt", "The history of",
                 "--max-new-tokens", "8"])
    assert j.returncode == 0 and j.stdout.strip(), j.stdout[-2000:] + j.stderr[-2000:]
    # llama.cpp (f32) and JAX pick the same greedy tokens. The printed texts are not compared: when the 8th token ends
    # inside a multi-byte character, llama-cpp-python generates on to finish it while our CLI prints U+FFFD.
    import minicpm_jax as mc
    from minicpm_jax.export.llamacpp import greedy, open_model
    ids = tok.encode("The history of", add_bos=True)
    jax_ids = [int(i) for i in mc.generate(params, cfg, [ids], max_new_tokens=16).sequences()[0]]
    llama_ids = greedy(open_model(tmp_path / "m.gguf", n_ctx=64), ids, 16)
    assert jax_ids and llama_ids[:len(jax_ids)] == jax_ids, (jax_ids, llama_ids)


def test_eval_command_reports_loss_per_source(uninterrupted):
    from tests.train.conftest import run_cli
    r = run_cli(["eval", "--checkpoint", str(uninterrupted), "--batches", "2"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "eval source" not in line]
    assert len(rows) >= 2 and rows[-1].startswith("| all |")
    assert 2.0 < float(rows[-1].split("|")[2]) < 10.0


def test_eval_always_uses_the_runs_own_tokenizer(uninterrupted, tmp_path):
    from minicpm_jax.train.evaluate import eval_config
    exp = eval_config(uninterrupted, [f"data_dir={tmp_path}", "data.seq_len=64"])
    assert exp.data.tokenizer.path == str(uninterrupted / "tokenizer") and exp.data_dir == str(tmp_path)


def test_a_diverging_run_stops_with_a_clear_error(prepared_data_dir, tmp_path):
    r = run_cli(CONFIG + train_overrides(tmp_path / "nan", prepared_data_dir, 8,
                                         ["optim.peak_lr=1e8", "optim.clip_grad_norm=0", "optim.warmup_steps=0"]))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "is not finite; stopping" in r.stderr and "last good checkpoint" in r.stderr
