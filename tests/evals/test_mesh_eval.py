"""Evaluation on a device mesh equals one device: the JAX backend's log-likelihoods and greedy needle answers on a
data=2 x tensor=2 mesh of fake CPU devices against the same model on one device; and `minicpm eval` on such a mesh
in a fresh process (`--fake-devices 4 mesh.data=2 mesh.tensor=2`) gives the one-device answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest
from lm_eval.api.instance import Instance

from minicpm_jax.evals.harness import MiniCPMLM
from minicpm_jax.evals.needles import read_jsonl
from minicpm_jax.evals.suite import SuiteSettings, run_tasks
from tests.evals.test_cli_eval import REPO
from tests.evals.test_loglikelihood import text

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (fake) devices; conftest sets 8")
ONE = {"data": 1, "fsdp": 1, "tensor": 1}
MESH = {"data": 2, "fsdp": 1, "tensor": 2}


@pytest.fixture(scope="module")
def one_device(tiny):
    return MiniCPMLM(pretrained=str(tiny.hf_dir), batch_size=4, mesh=ONE)


def test_loglikelihood_and_answers_on_a_mesh_equal_one_device(tiny, one_device):
    mesh = MiniCPMLM(pretrained=str(tiny.hf_dir), batch_size=4, **{f"mesh.{k}": v for k, v in MESH.items()})
    q = mesh.params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == 4 and "tensor" in str(q.sharding.spec)   # really spread over the mesh
    reqs = [Instance("loglikelihood", {}, (text(2, i), " " + text(1, 40 + i)), i) for i in range(6)]
    a = one_device.loglikelihood(reqs, disable_tqdm=True)
    b = mesh.loglikelihood(reqs, disable_tqdm=True)
    assert [g for _, g in a] == [g for _, g in b]
    assert max(abs(x - y) for (x, _), (y, _) in zip(a, b)) <= 1e-4
    gens = [Instance("generate_until", {}, (text(2, 10 * k), {"until": ["\n"], "max_gen_toks": 16}), k)
            for k in range(3)]        # 3 rows: they do not divide the data axis
    assert mesh.generate_until(gens, disable_tqdm=True) == one_device.generate_until(gens, disable_tqdm=True)


def test_minicpm_eval_on_a_mesh_of_fake_devices(tiny, one_device, tmp_path):
    report = tmp_path / "mesh" / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # the device count comes from --fake-devices
    r = subprocess.run([sys.executable, "-m", "minicpm_jax.cli", "eval", "--checkpoint", str(tiny.hf_dir), "--tasks",
                        "niah_en", "--lengths", "256", "--depths", "0,1", "--samples", "2", "--batch-size", "4", "--fake-devices", "4", "mesh.data=2", "mesh.tensor=2",
                        "--report", str(report)],
                       cwd=tmp_path, env=dict(env, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO)), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(report.read_text())
    assert doc["model"]["mesh"] == MESH
    run_tasks(one_device, ["niah_en"], SuiteSettings(lengths=(256,), depths=(0.0, 1.0), samples=2,
                                                     out_dir=tmp_path / "one"), log=lambda m: None)
    got = [p["prediction"] for p in read_jsonl(report.parent / "items" / "niah_en.predictions.jsonl")]
    want = [p["prediction"] for p in read_jsonl(tmp_path / "one" / "niah_en.predictions.jsonl")]
    assert got == want and len(set(want)) > 1
