"""Small real data for training tests, prepared once per machine and shared by pytest-xdist workers (file lock)."""

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Pip-only sources, capped: a ~1 MB bilingual corpus, a 512-piece tokenizer, one classifier round.
DATA_OVERRIDES = ["data.sources=[pip]", "data.max_docs_per_source=120", "data.max_mb_per_source=0.15",
                  "data.vocab_size=512", "data.seq_len=64", "data.batch_size=4", "data.classifier.rounds=1",
                  "data.tokenizer.max_train_mb=1.0"]
MODEL_OVERRIDES = ["model.vocab_size=512", "model.num_hidden_layers=2", "model.hidden_size=128",
                   "model.intermediate_size=256", "model.dim_model_base=128"]
FAST = ["train.eval_every=1000", "train.eval_batches=1", "export.hf=false", "export.gguf_qtypes=[]",
        "train.sample_prompts=[]", "train.log_every=1"]


def data_dir() -> Path:
    key = hashlib.sha256(" ".join(DATA_OVERRIDES).encode()).hexdigest()[:12]
    return REPO / ".cache" / "test-data" / key


@pytest.fixture(scope="session")
def prepared_data_dir():
    """Prepare the small dataset under .cache/test-data (cached; concurrent workers wait on a lock)."""
    from minicpm_jax.train.config import load_config
    from data_pipeline.prepare import prepare_data
    d = data_dir()
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(str(d) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        exp = load_config(REPO / "experiments/configs/tiny.yaml", DATA_OVERRIDES + [f"data_dir={d}"])
        prepare_data(d, exp.data, progress=False)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return d


def train_overrides(output_dir, data: Path, steps: int, extra=()):
    return (DATA_OVERRIDES + MODEL_OVERRIDES + FAST +
            [f"data_dir={data}", f"output_dir={output_dir}", f"train.steps={steps}", "optim.warmup_steps=2",
             "optim.decay_steps=2"] + list(extra))


def run_cli(args, env_extra=None, devices=1, timeout=600):
    """`minicpm ...` in a fresh process with `devices` fake CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("MINICPM_FAULT", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "minicpm_jax.cli"] + list(args), cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
