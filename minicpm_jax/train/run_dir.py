"""A training run directory's life: one writer, a resume that cannot mix two runs, nothing lost on the way.

    with RunLock(run_dir):                      # process 0, for the run's whole life
        start = open_run(exp, setup, ckpt, ...)  # resume, or start deliberately

Rules (every one of them a data-loss defect when broken):
- One writer: process 0 holds an exclusive `flock` on `<run>/.lock` (the kernel drops it when the process dies, so a
  killed run never leaves it stuck); a second writer is refused with the holder's pid and host.
- A resume restores or stops: a config whose model shapes differ from the run's recorded ones is refused naming the
  fields; an unrestorable newest checkpoint is moved aside to `checkpoints/corrupt-<step>-<n>/` (one line each) once an
  older one restores, so training can pass that step again; when none restores, nothing is moved and the run stops.
- `train.resume=false` over a run with checkpoints is refused unless `train.overwrite=true`, which first moves the old
  run's files into `<run>/previous-<n>/`. Nothing is written (config.yaml, tokenizer/, metrics) before that decision.
- Metrics rows after the restored step are dropped, so `metrics.jsonl` holds one row per step and split.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Optional

import yaml

from minicpm_jax.checkpoint import CheckpointError, Checkpointer, run_paths
from minicpm_jax.config import ModelConfig
from minicpm_jax.model_spec import ModelSection

# What a checkpoint's arrays depend on: a resume whose config changes one of these cannot restore.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings", "param_dtype")
RUN_FILES = ("checkpoints", "config.yaml", "tokenizer", "logs", "summary.json", "loss.png", "export", "profile")


class RunLock:
    """Exclusive writer lock of a run directory (a no-op on processes other than 0)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / ".lock"
        self.enabled = enabled
        self._fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"{self.path.parent} is in use by another training process ({holder}); two writers "
                             "would mix their checkpoints and metrics. Wait for it, stop it, or use another "
                             "output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def recorded_model(run_dir: str | Path) -> Optional[ModelConfig]:
    """The model config a run recorded in its config.yaml, or None when it has none."""
    path = run_paths(run_dir)["config"]
    if not path.is_file():
        return None
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: the run's recorded config is not valid YAML ({str(e).splitlines()[0]})") from None
    return ModelSection.from_dict(doc.get("model", {})).build()


def recorded_trains_draft(run_dir: str | Path) -> bool:
    """Whether a run's recorded config.yaml trains a draft head (`draft.target` set) rather than a model."""
    path = run_paths(run_dir)["config"]
    if not path.is_file():
        return False
    doc = yaml.safe_load(path.read_text()) or {}
    return bool((doc.get("draft") or {}).get("target"))


def shape_differences(recorded: ModelConfig, wanted: ModelConfig) -> list[str]:
    """'model.F: run has A, this config B' for each field a checkpoint's shapes depend on."""
    return [f"model.{f}: the run has {getattr(recorded, f)!r}, this config {getattr(wanted, f)!r}"
            for f in SHAPE_FIELDS if getattr(recorded, f) != getattr(wanted, f)]


def _free_name(parent: Path, stem: str) -> Path:
    n = 1
    while (parent / f"{stem}-{n}").exists():
        n += 1
    return parent / f"{stem}-{n}"


def move_old_run_aside(run_dir: Path) -> Path:
    """Move a finished or abandoned run's files into `<run>/previous-<n>/`; returns that directory."""
    dest = _free_name(run_dir, "previous")
    dest.mkdir()
    for name in RUN_FILES:
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), str(dest / name))
    return dest


def restore_or_stop(ckpt: Checkpointer, abstract_state, data_iter, say, move: bool = True) -> tuple[int, object]:
    """Restore the newest checkpoint that restores; newer ones that do not are moved aside (one line each; `move`:
    this process moves them, the others only follow).

    Raises CheckpointError, moving nothing, when no checkpoint restores."""
    try:
        step, state, _, skipped = ckpt.restore_latest(abstract_state, data_iter)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Nothing was moved or deleted: repair or remove the damaged steps, or start a "
                              "new run in another output_dir") from None
    for e in skipped if move else ():
        dest = _free_name(ckpt.directory, f"corrupt-{e.step}")
        shutil.move(str(ckpt.directory / str(e.step)), str(dest))
        say(f"checkpoint step {e.step} does not restore ({e.reason}); moved to {dest}")
    return step, state


def truncate_metrics(run_dir: Path, after_step: int) -> int:
    """Drop metrics rows of steps after `after_step` (a resumed run logs them again); returns how many."""
    path = run_dir / "logs" / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        try:
            if json.loads(ln)["step"] <= after_step:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue                   # a row cut by a kill mid-write
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines) - len(keep)
