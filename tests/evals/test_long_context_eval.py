"""experiments/long_context_eval.py: one `minicpm eval` per run and grid group, the start row, the comparison files.

`minicpm eval` itself is replaced by a fake that writes a report whose accuracy says which run and lengths it was
asked for, so the test checks the wiring (which checkpoint, which grid, where each report lands, which loss goes
with which row), not the model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("long_context_eval", ROOT / "experiments" / "long_context_eval.py")
lce = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lce)

ACC = {"000_dense": 0.5, "001_sparse_minicpm4": 0.25, "start": 0.75}     # per run directory name


def _run(path: Path, eval_loss=None, positions=8192):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"name: x\nmodel:\n  preset: tiny\n  max_position_embeddings: {positions}\n")
    if eval_loss is not None:
        (path / "logs").mkdir()
        rows = [{"split": "train", "step": 4, "loss": 3.0}, {"split": "eval", "step": 4, "loss": eval_loss}]
        (path / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def fake_eval(cmd, check):
        arg = lambda flag: cmd[cmd.index(flag) + 1]                       # noqa: E731
        run, lengths = Path(arg("--checkpoint")), [int(n) for n in arg("--lengths").split(",")]
        seen.append((run.name, arg("--lengths"), arg("--depths"), arg("--samples"), arg("--tasks")))
        acc = ACC[run.name]
        task = {"kind": "needle", "value": acc, "n": 4 * len(lengths), "floor_first_number": 0.0, "seconds": 1.0,
                "by_length": {str(n): acc for n in lengths}, "grid": {str(n): {"0.5": acc} for n in lengths},
                "leading_digits": 7 * acc, "digits_in_place": acc,
                "digits_by_length": {str(n): {"leading_digits": 7 * acc, "digits_in_place": acc} for n in lengths}}
        report = Path(arg("--report"))
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps({"model": str(run), "tasks": {t: task for t in arg("--tasks").split(",")}}))

    monkeypatch.setattr(lce.subprocess, "run", fake_eval)
    return seen


def test_start_row_first_then_the_arms_with_their_own_losses(tmp_path, calls):
    sweep = tmp_path / "sweep"
    _run(sweep / "000_dense", eval_loss=4.5)
    _run(sweep / "001_sparse_minicpm4", eval_loss=4.25)
    start = _run(tmp_path / "start", positions=4096)
    assert lce.main(["--sweep-dir", str(sweep), "--start", str(start), "--tasks", "niah_en",
                     "--grid", "1024,2048:0.5:2;4096,8192:0.5:1;16384:0.5:1"]) == 0
    # every run scored on every grid group, the start first, and only at lengths inside its positions; its
    # reports kept apart from the arms'
    assert [(c[0], c[1]) for c in calls] == [
        ("start", "1024,2048"), ("start", "4096"),
        ("000_dense", "1024,2048"), ("000_dense", "4096,8192"),
        ("001_sparse_minicpm4", "1024,2048"), ("001_sparse_minicpm4", "4096,8192")]
    assert {c[2:] for c in calls} == {("0.5", "2", "niah_en"), ("0.5", "1", "niah_en")}
    assert (sweep / "start-eval" / "group-1" / "report.json").is_file()
    assert (sweep / "000_dense" / "eval" / "group-0" / "report.json").is_file()
    md = (sweep / "comparison.md").read_text()
    rows = [line for line in md.split("Partial credit")[0].splitlines() if line.startswith("| ")][1:]
    # the start: no loss (its own final eval was not at 2K), no 8K (past its positions)
    assert rows[0].startswith("| start | — | 0.75 | 0.75 | 0.75 | — |")
    assert rows[1].startswith("| dense | 4.5000 | 0.50 | 0.50 | 0.50 | 0.50 |")
    assert rows[2].startswith("| sparse_minicpm4 | 4.2500 | 0.25 | 0.25 | 0.25 | 0.25 |")
    assert "| dense | 3.50 / 0.50 | 3.50 / 0.50 | 3.50 / 0.50 | 3.50 / 0.50 |" in md.split("Partial credit")[1]
    summary = json.loads((sweep / "comparison.json").read_text())
    assert summary["final_eval_loss"] == {"dense": 4.5, "sparse_minicpm4": 4.25}
    assert list(summary["reports"]) == ["start", "dense", "sparse_minicpm4"]
    assert (sweep / "comparison.png").is_file()


def test_a_start_that_is_not_a_run_is_refused(tmp_path, calls):
    _run(tmp_path / "sweep" / "000_dense", eval_loss=4.5)
    with pytest.raises(SystemExit, match="not a run directory"):
        lce.main(["--sweep-dir", str(tmp_path / "sweep"), "--start", str(tmp_path / "nowhere")])
    assert calls == []
