"""Every shipped pod config fits the accelerator it names, by the dry run on fake CPU devices, with no involuntary
SPMD rematerialisation (replicate, then re-partition) in its step. Fails when a config grows past its budget."""

import json
import os
import subprocess
import sys

import pytest

from minicpm_jax.train.config import ACCELERATORS, load_config, resolve_config_path
from minicpm_jax.train.dry_run import BUDGET

# (config, fake devices, hosts) as each config's header says to check it
POD_CONFIGS = [("long_context_sparse", 64, 16), ("minicpm4_8b", 256, 32), ("minicpm4_0p5b", 64, 8)]


@pytest.mark.parametrize("name,devices,hosts", POD_CONFIGS, ids=[c[0] for c in POD_CONFIGS])
def test_pod_config_fits_its_accelerator(name, devices, hosts, tmp_path):
    exp = load_config(resolve_config_path(name))
    assert exp.mesh.accelerator in ACCELERATORS, f"{name}: a pod config must name mesh.accelerator"
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([sys.executable, "-m", "minicpm_jax.cli", "train", "--config", name, "--dry-run",
                           "--fake-devices", str(devices), "--processes", str(hosts), "--dry-run-json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["devices"] == devices and report["fits"] is True
    assert report["peak_bytes_per_device"] <= BUDGET * ACCELERATORS[exp.mesh.accelerator]
    assert "Involuntary full rematerialization" not in proc.stderr
    assert f"{exp.mesh.accelerator}" in proc.stdout and "fits" in proc.stdout and "all-gather" in proc.stdout


def test_a_config_over_budget_fails_the_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = tmp_path / "report.json"
    # the tiny config on a 16 GB chip fits; claim a far longer sequence on the smallest chip and it must not
    proc = subprocess.run([sys.executable, "-m", "minicpm_jax.cli", "train", "--config", "tiny", "--dry-run",
                           "--fake-devices", "2", "--dry-run-json", str(out), "mesh.accelerator=tpu-v5e",
                           "data.seq_len=65536", "data.batch_size=16", "model.attention=dense",
                           "model.remat_policy=none", "model.max_position_embeddings=65536"],
                          capture_output=True, text=True, env=env, timeout=600)
    report = json.loads(out.read_text())
    assert proc.returncode == 1 and report["fits"] is False, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "DOES NOT FIT" in proc.stdout


def test_unknown_accelerator_is_an_error():
    with pytest.raises(ValueError, match="mesh.accelerator"):
        load_config(resolve_config_path("tiny"), ["mesh.accelerator=h1000"])
