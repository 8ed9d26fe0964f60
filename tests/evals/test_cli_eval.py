"""`minicpm eval --tasks ...` on an HF directory: the JSON report, the PNG, the item JSONL, the printed table; and
the errors that name the problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def minicpm(*args, cwd):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "minicpm_jax.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_tasks_report_table_and_plot(tiny, tmp_path):
    report = tmp_path / "out" / "report.json"
    r = minicpm("eval", "--checkpoint", str(tiny.hf_dir), "--tasks", "niah_en,niah_zh_multikey,minicpm_cloze_en",
                "--lengths", "1024,2048", "--depths", "0,1", "--samples", "1", "--limit", "4", "--batch-size", "4",
                "--report", str(report), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "lengths [2048] exceed the model's 1024 positions" in r.stderr
    doc = json.loads(report.read_text())
    assert set(doc["tasks"]) == {"niah_en", "niah_zh_multikey", "minicpm_cloze_en"}
    niah = doc["tasks"]["niah_en"]
    assert niah["n"] == 2 and list(niah["grid"]) == ["1024"] and list(niah["grid"]["1024"]) == ["0.0", "1.0"]
    assert niah["floor_first_number"] == 1.0 and doc["tasks"]["niah_zh_multikey"]["floor_first_number"] < 1.0
    assert doc["tasks"]["minicpm_cloze_en"]["n"] == 4 and all(t["seconds"] > 0 for t in doc["tasks"].values())
    assert doc["model"]["model_source"] == f"HF checkpoint {tiny.hf_dir}"
    items = [json.loads(x) for x in (report.parent / "items" / "niah_en.items.jsonl").read_text().splitlines()]
    preds = [json.loads(x) for x in (report.parent / "items" / "niah_en.predictions.jsonl").read_text().splitlines()]
    assert [i["id"] for i in items] == [p["id"] for p in preds] and len(items) == 2
    assert (report.with_suffix(".png")).stat().st_size > 10_000
    for row in ("| niah_en | accuracy |", "| niah_en @ 1024 |", "| minicpm_cloze_en | acc |"):
        assert row in r.stdout, r.stdout


def test_errors_name_the_problem(tiny, tmp_path):
    r = minicpm("eval", "--checkpoint", str(tiny.hf_dir), "--tasks", "heldout,niah_en", cwd=tmp_path)
    assert r.returncode == 2 and "task heldout needs a training run directory" in r.stderr, r.stderr[-2000:]
    r = minicpm("eval", "--checkpoint", str(tiny.hf_dir), "--tasks", "niah_en", "--lengths", "1k", cwd=tmp_path)
    assert r.returncode == 2 and "--lengths must be comma-separated integers" in r.stderr, r.stderr[-2000:]
    r = minicpm("eval", "--checkpoint", str(tiny.hf_dir), "--tasks", "niah_en", "--lengths", "4096", cwd=tmp_path)
    assert r.returncode == 2 and "no length fits the model's 1024 positions" in r.stderr, r.stderr[-2000:]
