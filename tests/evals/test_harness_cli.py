"""lm-eval's own command line (`python -m minicpm_jax.evals.harness_cli`, which is `lm-eval` with the minicpm_jax
model registered) runs a shipped task on an HF directory from another working directory and writes its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_lm_eval_command_line(tiny, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=str(REPO))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "minicpm_jax.evals.harness_cli", "run", "--model", "minicpm_jax",
                          "--model_args", f"pretrained={tiny.hf_dir}", "--tasks", "minicpm_cloze_en",
                          "--batch_size", "4", "--metadata", json.dumps({"cloze_samples": 4}),
                          "--output_path", str(out), "--log_samples"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "minicpm_cloze_en" in run.stdout and "acc" in run.stdout, run.stdout
    results = list(out.rglob("results_*.json"))
    assert len(results) == 1, list(out.rglob("*"))
    doc = json.loads(results[0].read_text())
    acc = doc["results"]["minicpm_cloze_en"]["acc,none"]
    assert doc["n-samples"]["minicpm_cloze_en"]["effective"] == 4 and 0.0 <= acc <= 1.0
    samples = [json.loads(line) for f in out.rglob("samples_minicpm_cloze_en_*.jsonl") for line in f.open()]
    assert sum(s["acc"] for s in samples) / 4 == acc
    assert doc["config"]["model_source"] == f"HF checkpoint {tiny.hf_dir}"
