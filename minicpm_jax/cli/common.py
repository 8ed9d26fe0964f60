"""What every `minicpm` command shares: fake devices for dry runs, loading an experiment, one-line errors."""

from __future__ import annotations

import os

import jax

from minicpm_jax.checkpoint import CheckpointError
from minicpm_jax.train.config import ExperimentConfig, default_config_path, load_config

# Errors a user can act on: printed as one line "minicpm <command>: error: ..." with exit code 2 (MINICPM_DEBUG=1
# shows the traceback).
USER_ERRORS = (ValueError, OSError, FloatingPointError, CheckpointError)


def set_fake_devices(n: int | None) -> None:
    """N fake CPU devices. Must run before the first computation; JAX_PLATFORMS is read at import (too late here),
    so the platform goes through jax.config and the device count through XLA_FLAGS."""
    if n:
        jax.config.update("jax_platforms", "cpu")
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def load_experiment(config: str | None, overrides, *, coordinator=None, num_processes=None,
                    process_id=None) -> ExperimentConfig:
    """The experiment of `--config` (default: the shipped tiny run) with key=value overrides and multi-host flags."""
    overrides = list(overrides)
    if coordinator:  # a missing count or id is left unset, so the config's own check names it
        overrides += ["distributed.mode=explicit", f"distributed.coordinator_address={coordinator}"]
        overrides += [f"distributed.{k}={v}" for k, v in (("num_processes", num_processes),
                                                          ("process_id", process_id)) if v is not None]
    return load_config(config or default_config_path(), overrides)
