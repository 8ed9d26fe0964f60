"""Two processes on localhost (jax.distributed over gloo, one CPU device each) train the tiny config for a few steps
with the same losses as one process holding both devices and both processes' data shards."""

import json
import os
import socket
import subprocess
import sys

import pytest

from minicpm_jax.train.metrics import read_metrics
from tests.train.conftest import REPO, train_overrides

STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices):
    e = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    e.pop("MINICPM_FAULT", None)
    return e


@pytest.mark.multiprocess
def test_two_processes_match_one_process(prepared_data_dir, tmp_path):
    overrides = train_overrides(tmp_path / "run", prepared_data_dir, STEPS, ["train.checkpoint_every=1000"])
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "minicpm_jax.cli", "train", "--config",
                               "experiments/configs/tiny.yaml", "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(pid)] + overrides,
                              cwd=REPO, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]
    assert "2 devices on 2 process(es)" in outs[0]
    multi = [r["loss"] for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert len(multi) == STEPS

    ref_file = tmp_path / "ref.json"
    r = subprocess.run([sys.executable, "-m", "tests.train.multihost_reference", str(ref_file)]
                       + train_overrides(tmp_path / "ref", prepared_data_dir, STEPS), cwd=REPO, env=env(2),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    single = json.loads(ref_file.read_text())
    print("2-process losses:", multi, "\n1-process losses:", single)
    assert multi == pytest.approx(single, rel=1e-5)
    assert multi[-1] < multi[0]
