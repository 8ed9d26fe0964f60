"""Run-directory checkpoints with orbax: train state + grain iterator state + JSON metadata, saved asynchronously.

Training writes them (`minicpm_jax.train`); the weight resolver (`minicpm_jax.weights`) reads their params for
`init_from`, eval, export and generate, so this module sits at the model level, below both.

Layout: `<run>/checkpoints/<step>/{state,data,meta}` (orbax CheckpointManager). Orbax writes each step into a
temporary directory and commits it by renaming, so a process killed mid-save leaves the previous steps intact and
the unfinished one invisible. A committed step that fails to restore (truncated or deleted files) raises
`CheckpointError` naming the step and directory; `restore_latest` returns the newest step that restores and the
errors of the newer ones it skipped.
The run's `config.yaml` and `tokenizer/` sit beside `checkpoints/`, so a run directory is self-describing.
"""

from __future__ import annotations

import logging
import sys
import threading
import types
from pathlib import Path
from typing import Optional

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def _is_aftermath(exc) -> bool:
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _silence_failed_read_aftermath() -> None:
    """After one array of a restore fails, orbax abandons the other reads: their coroutines and TensorStore callbacks
    then die against a closed event loop and print hundreds of traceback lines that say nothing about the checkpoint.
    The CheckpointError names the step; these hooks drop only that aftermath (installed once, everything else passes)."""
    if getattr(sys.unraisablehook, "_minicpm", False):
        return
    prev_unraisable, prev_thread = sys.unraisablehook, threading.excepthook

    def unraisable(u):
        if not (isinstance(u.object, types.CoroutineType) or _is_aftermath(u.exc_value)):
            prev_unraisable(u)

    def thread_hook(args):
        if not _is_aftermath(args.exc_value):
            prev_thread(args)

    unraisable._minicpm = True
    sys.unraisablehook, threading.excepthook = unraisable, thread_hook


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; `step` and `reason` (one line) when it is one step."""

    def __init__(self, msg: str, step: Optional[int] = None, reason: str = ""):
        super().__init__(msg)
        self.step, self.reason = step, reason


class Checkpointer:
    """Wraps `ocp.CheckpointManager` for (state, data iterator, meta)."""

    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True, cleanup_tmp_directories=True),
            item_names=("state", "data", "meta"))

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.mngr.latest_step()

    def save(self, step: int, state, data_iter, meta: dict, *, force: bool = True) -> bool:
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        return self.mngr.save(step, args=ocp.args.Composite(**args), force=force)

    def restore(self, step: int, abstract_state, data_iter=None, *, params_only: bool = False):
        """(state, meta) of `step`; the data iterator (if given) is restored in place.

        params_only: `abstract_state` is the abstract params tree and only the state's params are read (the optimizer
        moments, twice the params' bytes, stay on disk); returns (params, meta).
        """
        if params_only:
            item = {"params": abstract_state}
            state_arg = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                               restore_args=ocp.checkpoint_utils.construct_restore_args(item))
        else:
            state_arg = ocp.args.StandardRestore(abstract_state)
        args = {"state": state_arg, "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.mngr.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:   # orbax raises many types for damaged files; name the step either way
            _silence_failed_read_aftermath()
            first = str(e).splitlines()[0].split(" See full TensorStore details")[0] if str(e) else ""
            reason = f"{type(e).__name__}: {first[:200]}"
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be restored ({reason}); it is partial or corrupt "
                f"(available steps: {self.steps()})", step=step, reason=reason) from e
        return (out.state["params"] if params_only else out.state), out.meta

    def restore_latest(self, abstract_state, data_iter=None, *, params_only: bool = False):
        """Restore the newest step that restores: (step, state, meta, skipped), where `skipped` holds the
        CheckpointError of each newer step that did not. Raises CheckpointError when no step restores (or none
        exists); what to do with skipped steps (warn, move aside) is the caller's decision."""
        skipped: list[CheckpointError] = []
        for step in reversed(self.steps()):
            try:
                state, meta = self.restore(step, abstract_state, data_iter, params_only=params_only)
                return step, state, meta, skipped
            except CheckpointError as e:
                skipped.append(e)
        details = "; ".join(f"step {e.step}: {e.reason}" for e in skipped) or "no committed step"
        raise CheckpointError(f"no checkpoint in {self.directory} restores ({details})")

    def reload(self):
        """Re-read the committed steps from disk (after steps were moved aside)."""
        self.mngr.reload()

    def wait(self):
        self.mngr.wait_until_finished()

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()


def run_paths(run_dir: str | Path) -> dict[str, Path]:
    """The files of a training run directory."""
    run = Path(run_dir)
    return {"run": run, "config": run / "config.yaml", "checkpoints": run / "checkpoints",
            "tokenizer": run / "tokenizer"}
