"""Atomic output files: written under a temporary name in the target directory, renamed only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`, on error removed.

    A reader never sees a half-written file, and an existing good file survives a failed export. Temporary files
    that a killed export of the same target left behind (their process is gone) are removed first.
    """
    path = Path(path)
    check_output_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_output_path(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Fail before any work when `path` cannot be written: an existing directory where a file goes (or a file where
    a directory goes), or a parent that is not a writable directory."""
    path = Path(path)
    if path.is_dir() and not directory:
        raise IsADirectoryError(f"output {path} is an existing directory; name a file (e.g. {path / 'model.gguf'})")
    if path.exists() and directory and not path.is_dir():
        raise NotADirectoryError(f"output {path} is an existing file; an HF export is a directory")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output {path}: cannot write in {parent} (not a writable directory)")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove `.NAME.tmp-<pid>-*` files beside `path` whose writer process no longer exists."""
    removed = []
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
            os.kill(pid, 0)
            continue                               # its writer is alive
        except ProcessLookupError:
            pass
        except (ValueError, IndexError, PermissionError):
            continue
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed
