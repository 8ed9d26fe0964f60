"""`pip install .` gives a working `minicpm` outside the checkout: shipped configs, every command, every benchmark."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A non-editable install of a copy of the sources (only what pyproject.toml ships ends up installed)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("minicpm_jax", "data_pipeline", "pallas_kernels"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    site = tmp / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(site), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    shutil.rmtree(src)                       # nothing may come from the sources any more
    work = tmp / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    return site, work, env


def minicpm(installed, *args, timeout=600):
    site, work, env = installed
    return subprocess.run([str(site / "bin" / "minicpm"), *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_installed_package_is_the_one_imported(installed):
    site, work, env = installed
    r = subprocess.run([sys.executable, "-c", "import minicpm_jax, data_pipeline; print(minicpm_jax.__file__)"],
                       cwd=work, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().startswith(str(site)), r.stdout + r.stderr


@pytest.mark.parametrize("command", [["--help"], ["train", "--help"], ["generate", "--help"], ["eval", "--help"],
                                     ["export", "--help"], ["data", "--help"], ["sweep", "--help"],
                                     ["bench", "sparse", "--help"], ["bench", "train", "--help"],
                                     ["bench", "data", "--help"], ["bench", "edge", "--help"], ["bench", "mup", "--help"],
                                     ["bench", "mup-transfer", "--help"]])
def test_every_command_and_benchmark_is_there(installed, command):
    r = minicpm(installed, *command)
    assert r.returncode == 0 and "usage: minicpm" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


def test_the_default_main_job_config_ships_with_the_package(installed):
    """`minicpm train` with no --config takes the shipped tiny config; a dry run compiles its step."""
    r = minicpm(installed, "train", "--dry-run", "train.steps=60")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "dry run: tiny" in r.stdout and "peak_bytes_per_device" in r.stdout
    r = minicpm(installed, "train", "--dry-run", "--fake-devices", "4", "--config", "minicpm4_0p5b",
                "model.num_hidden_layers=1", "data.batch_size=4", "data.seq_len=128")
    assert r.returncode == 0 and "dry run: minicpm4_0p5b" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    r = minicpm(installed, "train", "--config", "no_such_config")
    assert r.returncode == 2 and "shipped configs: " in r.stderr and "tiny" in r.stderr, r.stderr
