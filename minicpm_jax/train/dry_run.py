"""`minicpm train --dry-run`: compile the train step for the configured mesh ahead of time and report its memory.

Nothing is allocated: parameters, optimizer state and the batch are ShapeDtypeStructs with their shardings, and
`jit(...).lower(...).compile()` runs the real partitioner, so a pod config can be checked on a laptop with fake CPU
devices (`--fake-devices N`) before launch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minicpm_jax.model import abstract_params, param_logical_axes
from minicpm_jax.sharding import axis_rules, make_mesh
from minicpm_jax.train.config import ExperimentConfig
from minicpm_jax.train.loop import check_batch_layout
from minicpm_jax.train.metrics import train_flops_per_token
from minicpm_jax.train.optimizer import make_optimizer
from minicpm_jax.train.step import (BATCH_KEYS, abstract_state, batch_sharding, jit_train_step, make_train_step,
                                    state_shardings, with_shardings)


def _gib(x) -> str:
    return f"{x / 2 ** 30:8.2f} GiB"


def dry_run(exp: ExperimentConfig, processes: int = 1) -> dict:
    """Lower and compile one train step; print and return the per-device memory analysis."""
    cfg = exp.model_config()
    dcfg = exp.data_config()
    mesh = make_mesh(exp.mesh.as_dict())
    global_batch, seq_len = dcfg.batch_size * processes, dcfg.seq_len
    check_batch_layout(global_batch, exp.train.micro_batches, mesh)
    ap = abstract_params(cfg)
    tx, schedule = make_optimizer(exp.optim, cfg, ap, exp.train.steps)
    st_sh = state_shardings(mesh, ap, param_logical_axes(cfg), tx)
    state = with_shardings(abstract_state(ap, tx), st_sh)
    bsh = batch_sharding(mesh, (global_batch, seq_len))
    batch = {k: jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=bsh) for k in BATCH_KEYS}
    step = jit_train_step(make_train_step(cfg, tx, schedule, micro_batches=exp.train.micro_batches,
                                          attention=exp.train.attention, loss_chunk=exp.train.loss_chunk_size),
                          mesh, st_sh, (global_batch, seq_len))
    with jax.set_mesh(mesh), axis_rules():
        compiled = step.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    n_dev = jax.device_count()
    report = {
        "devices": n_dev, "mesh": dict(mesh.shape), "params": cfg.param_count(),
        "tokens_per_step": global_batch * seq_len,
        "model_tflops_per_step": train_flops_per_token(cfg, seq_len) * global_batch * seq_len / 1e12,
        "argument_bytes": getattr(mem, "argument_size_in_bytes", 0),
        "output_bytes": getattr(mem, "output_size_in_bytes", 0),
        "temp_bytes": getattr(mem, "temp_size_in_bytes", 0),
        "alias_bytes": getattr(mem, "alias_size_in_bytes", 0),
        "generated_code_bytes": getattr(mem, "generated_code_size_in_bytes", 0),
    }
    report["peak_bytes_per_device"] = (report["argument_bytes"] + report["output_bytes"] + report["temp_bytes"]
                                       - report["alias_bytes"])
    print(f"dry run: {exp.name} — {cfg.param_count() / 1e9:.3f}B params on {n_dev} devices, mesh {dict(mesh.shape)}")
    print(f"  global batch {global_batch} x {seq_len} = {global_batch * seq_len:,} tokens/step, "
          f"{report['model_tflops_per_step']:.1f} model TFLOPs/step, micro-batches {exp.train.micro_batches}, "
          f"remat {cfg.remat_policy}, dtype {cfg.dtype}/{cfg.param_dtype}")
    print("  per-device memory (XLA memory analysis of the compiled step):")
    for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes_per_device"):
        print(f"    {k:<24}{_gib(report[k])}")
    return report
