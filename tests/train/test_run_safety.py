"""A run is never lost or mixed up (issue #10): refused resumes change nothing, corrupt steps are passed, one writer
per run directory, one metrics row per step, and every user error is one line with exit code 2."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minicpm_jax.cli import main as minicpm
from minicpm_jax.train.metrics import read_metrics
from tests.train.conftest import REPO, run_cli, train_overrides

CONFIG = ["train", "--config", "experiments/configs/tiny.yaml"]


def overrides(out, data, steps, extra=()):
    # a data_dir relative to the repository, as a user writes it: the run must record it absolute
    rel = os.path.relpath(data, REPO)
    return train_overrides(out, data, steps, ["train.checkpoint_every=2", f"data_dir={rel}", *extra])


@pytest.fixture(scope="module")
def finished(prepared_data_dir, tmp_path_factory):
    """A finished 6-step run (checkpoints 4 and 6) and its f32 GGUF export."""
    out = tmp_path_factory.mktemp("safety") / "run"
    r = run_cli(CONFIG + overrides(out, prepared_data_dir, 6))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = run_cli(["export", "--checkpoint", str(out), "--format", "gguf", "--qtype", "f32", "--out",
                 str(out.parent / "run.gguf")])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture
def run(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


def corrupt(run: Path, step: int) -> None:
    for f in (run / "checkpoints" / str(step) / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 4096:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("minicpm ")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


def test_the_run_records_absolute_paths(finished, prepared_data_dir):
    import yaml
    doc = yaml.safe_load((finished / "config.yaml").read_text())
    assert doc["data_dir"] == str(prepared_data_dir.resolve())


def test_a_resume_with_other_model_shapes_is_refused_and_changes_nothing(run, prepared_data_dir):
    before = snapshot(run)
    r = run_cli(CONFIG + overrides(run, prepared_data_dir, 8, ["model.num_hidden_layers=1"]))
    one_line_error(r, "refusing to resume", "model.num_hidden_layers: the run has 2, this config 1")
    assert snapshot(run) == before


def test_a_resume_where_no_checkpoint_restores_stops_and_deletes_nothing(run, prepared_data_dir):
    corrupt(run, 4)
    corrupt(run, 6)
    before = snapshot(run)
    r = run_cli(CONFIG + overrides(run, prepared_data_dir, 8))
    one_line_error(r, "no checkpoint in", "step 6:", "step 4:", "Nothing was moved or deleted")
    assert snapshot(run) == before and steps(run) == [4, 6]


def test_resume_false_over_a_run_is_refused_and_overwrite_moves_the_old_run_aside(run, prepared_data_dir):
    before = snapshot(run)
    r = run_cli(CONFIG + overrides(run, prepared_data_dir, 6, ["train.resume=false"]))
    one_line_error(r, "train.resume=false would train a new run into it", "train.overwrite=true")
    assert snapshot(run) == before
    r = run_cli(CONFIG + overrides(run, prepared_data_dir, 6, ["train.resume=false", "train.overwrite=true"]))
    assert r.returncode == 0, r.stderr[-3000:]
    old = run / "previous-1"
    assert {k[len("previous-1/"):]: v for k, v in snapshot(run).items() if k.startswith("previous-1/")} == before
    assert steps(old) == [4, 6] and steps(run) == [4, 6]
    assert [m["step"] for m in read_metrics(run) if m["split"] == "train"] == list(range(1, 7))


def test_a_corrupt_newest_checkpoint_is_moved_aside_and_training_passes_that_step(run, prepared_data_dir):
    corrupt(run, 6)
    r = run_cli(CONFIG + overrides(run, prepared_data_dir, 8))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "checkpoint step 6 does not restore" in r.stdout and "resumed from" in r.stdout
    assert (run / "checkpoints" / "corrupt-6-1").is_dir() and steps(run) == [6, 8]
    rows = [m["step"] for m in read_metrics(run) if m["split"] == "train"]
    assert rows == list(range(1, 9)), rows                    # steps 5-6 of the first run were dropped, then redone
    summary = json.loads((run / "summary.json").read_text())
    assert [s for s, _ in summary["train_losses"]] == list(range(1, 9))   # the whole run, not the resumed segment


def test_metrics_hold_one_row_per_step_after_a_kill_and_resume(prepared_data_dir, tmp_path):
    out = tmp_path / "killed"
    args = CONFIG + overrides(out, prepared_data_dir, 6)
    r = run_cli(args, {"MINICPM_FAULT": "after_step:5"})    # last checkpoint 4, step 5 logged, then killed
    assert r.returncode == 17, r.stderr[-2000:]
    assert [m["step"] for m in read_metrics(out) if m["split"] == "train"] == [1, 2, 3, 4, 5]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out) if m["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_a_second_writer_is_refused_and_a_killed_writers_lock_does_not_block(run, prepared_data_dir):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from minicpm_jax.train.run_dir import RunLock;"
                               " RunLock(sys.argv[1]).__enter__(); print('locked', flush=True); time.sleep(600)",
                               str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        r = run_cli(CONFIG + overrides(run, prepared_data_dir, 8))
        one_line_error(r, "is in use by another training process", f"pid {holder.pid} on host")
        assert snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    r = run_cli(CONFIG + overrides(run, prepared_data_dir, 8))       # the kernel released the dead holder's lock
    assert r.returncode == 0, r.stderr[-3000:]
    assert steps(run) == [6, 8]


def test_eval_from_another_directory_uses_the_runs_own_data(finished, tmp_path):
    here = run_cli(["eval", "--checkpoint", str(finished), "--batches", "2"])
    assert here.returncode == 0, here.stderr[-3000:]
    env = {"PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "minicpm_jax.cli", "eval", "--checkpoint", str(finished), "--batches",
                        "2"], cwd=tmp_path, env={**os.environ, **env, "JAX_PLATFORMS": "cpu"}, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / ".cache").exists()
    table = lambda out: [ln for ln in out.splitlines() if ln.startswith("| all")]
    assert table(r.stdout) == table(here.stdout) != []
    assert "weights: training run" in r.stderr and "checkpoint step 6" in r.stderr


@pytest.mark.parametrize("case", ["yaml", "config_dir", "eval_batches", "eval_corrupt_step", "eval_all_corrupt",
                                  "export_all_corrupt", "export_out_dir", "export_out_parent", "prompt_bytes",
                                  "gguf_broken"])
def test_user_errors_are_one_line_with_exit_code_2(case, run, tmp_path):
    if case == "yaml":
        bad = tmp_path / "bad.yaml"
        bad.write_text("train:\n  steps: [1,\n")
        one_line_error(run_cli(["train", "--config", str(bad)]), str(bad), "not valid YAML")
    elif case == "config_dir":
        one_line_error(run_cli(["train", "--config", str(tmp_path)]), "is a directory")
    elif case == "eval_batches":
        one_line_error(run_cli(["eval", "--checkpoint", str(run), "--batches", "0"]), "--batches must be >= 1")
    elif case == "eval_corrupt_step":
        corrupt(run, 6)
        one_line_error(run_cli(["eval", "--checkpoint", str(run), "--step", "6"]), "checkpoint step 6", "corrupt")
    elif case == "eval_all_corrupt":
        corrupt(run, 4)
        corrupt(run, 6)
        one_line_error(run_cli(["eval", "--checkpoint", str(run)]), "no checkpoint in", "restores (step 6:")
    elif case == "export_all_corrupt":
        corrupt(run, 4)
        corrupt(run, 6)
        one_line_error(run_cli(["export", "--checkpoint", str(run), "--out", str(tmp_path / "m.gguf")]),
                       "no checkpoint in", "restores (step 6:")
        assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".m.gguf*"))
    elif case == "export_out_dir":
        t0 = time.time()
        one_line_error(run_cli(["export", "--checkpoint", str(run), "--out", str(tmp_path)]), "existing directory")
        assert time.time() - t0 < 60                        # refused before loading and exporting
    elif case == "export_out_parent":
        (tmp_path / "file").write_text("x")
        one_line_error(run_cli(["export", "--checkpoint", str(run), "--out", str(tmp_path / "file" / "m.gguf")]),
                       "not a writable directory")
    elif case == "prompt_bytes":
        r = subprocess.run([sys.executable, "-m", "minicpm_jax.cli", "generate", "--checkpoint", str(run).encode(),
                            "--prompt", b"caf\xe9 \xff"], cwd=REPO, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"})
        one_line_error(r, "--prompt is not valid UTF-8")
    elif case == "gguf_broken":
        g = tmp_path / "broken.gguf"
        g.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)          # a header that lies about its sizes
        one_line_error(run_cli(["generate", "--gguf", str(g), "--prompt", "hi"]), str(g), "not a readable GGUF")


def test_a_killed_exports_temporary_file_is_removed_by_the_next_export(finished, tmp_path):
    out = tmp_path / "m.gguf"
    stale = tmp_path / ".m.gguf.tmp-999999999-deadbeef"          # no such pid
    stale.write_bytes(b"half a file")
    r = run_cli(["export", "--checkpoint", str(finished), "--qtype", "f32", "--out", str(out)])
    assert r.returncode == 0 and out.is_file(), r.stderr[-2000:]
    assert not stale.exists() and not list(tmp_path.glob(".m.gguf.tmp-*"))


SETTINGS = [(["--max-new-tokens", "0"], "max_new_tokens (--max-new-tokens) must be an integer >= 1"),
            (["--max-new-tokens", "-3"], "max_new_tokens (--max-new-tokens) must be an integer >= 1"),
            (["--top-p", "0"], "top_p (--top-p) must be in (0, 1]"),
            (["--top-p", "1.5"], "top_p (--top-p) must be in (0, 1]"),
            (["--temperature", "-1"], "temperature (--temperature) must be a number >= 0"),
            (["--temperature", "nan"], "temperature (--temperature) must be a number >= 0"),
            (["--top-k", "-1"], "top_k (--top-k) must be an integer >= 0"),
            (["--max-new-tokens", "5000"], "exceed the model's 4096 positions")]


@pytest.mark.parametrize("flags,message", SETTINGS, ids=[" ".join(f) for f, _ in SETTINGS])
def test_generation_settings_mean_the_same_for_jax_and_gguf(flags, message, finished, capsys):
    gguf = finished.parent / "run.gguf"
    for source in (["--checkpoint", str(finished)], ["--gguf", str(gguf)]):
        capsys.readouterr()
        assert minicpm(["generate", *source, "--prompt", "The history of", *flags]) == 2, source
        err = capsys.readouterr().err
        errors = [ln for ln in err.splitlines() if ln.startswith("minicpm generate: error: ")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in err, (source, err)


def test_a_long_prompt_is_refused_or_truncated_from_the_left_when_asked(finished, capsys):
    long_ids = ",".join(["5"] * 4090)
    for source in (["--checkpoint", str(finished)], ["--gguf", str(finished.parent / "run.gguf")]):
        assert minicpm(["generate", *source, "--prompt-ids", long_ids, "--max-new-tokens", "8"]) == 2
        assert "exceed the model's 4096 positions" in capsys.readouterr().err
        assert minicpm(["generate", *source, "--prompt-ids", long_ids, "--max-new-tokens", "8",
                        "--truncate-prompt"]) == 0, source
        capsys.readouterr()
