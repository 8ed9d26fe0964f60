"""`minicpm train --dry-run`: compile the train step for the configured mesh ahead of time and report its memory.

Nothing is allocated: parameters, optimizer state and the batch are ShapeDtypeStructs with their shardings, and
`jit(...).lower(...).compile()` runs the real partitioner, so a pod config can be checked on a laptop with fake CPU
devices (`--fake-devices N`) before launch.
"""

from __future__ import annotations

import jax

from minicpm_jax.sharding import axis_rules, make_mesh
from minicpm_jax.train.config import ExperimentConfig
from minicpm_jax.train.step import build_step


def _gib(x) -> str:
    return f"{x / 2 ** 30:8.2f} GiB"


def dry_run(exp: ExperimentConfig, processes: int = 1) -> dict:
    """Lower and compile one train step; print and return the per-device memory analysis."""
    cfg = exp.model_config()
    global_batch, seq_len = exp.data.batch_size * processes, exp.data.seq_len
    setup = build_step(cfg, make_mesh(exp.mesh.as_dict()), (global_batch, seq_len), attention=exp.model.attention,
                       optim=exp.optim, total_steps=exp.train.steps, micro_batches=exp.train.micro_batches,
                       loss_chunk=exp.train.loss_chunk_size)
    mesh = setup.mesh
    with jax.set_mesh(mesh), axis_rules():
        compiled = setup.train_step.lower(setup.abstract_state(), setup.abstract_batch()).compile()
    mem = compiled.memory_analysis()
    n_dev = jax.device_count()
    report = {
        "devices": n_dev, "mesh": dict(mesh.shape), "params": cfg.param_count(),
        "tokens_per_step": global_batch * seq_len, "attention": "sparse" if setup.plan.sparse else "dense",
        "model_tflops_per_step": setup.flops_per_token * global_batch * seq_len / 1e12,
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
          f"{report['model_tflops_per_step']:.1f} model TFLOPs/step ({report['attention']} attention), "
          f"micro-batches {exp.train.micro_batches}, remat {cfg.remat_policy}, dtype {cfg.dtype}/{cfg.param_dtype}")
    print("  per-device memory (XLA memory analysis of the compiled step):")
    for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes_per_device"):
        print(f"    {k:<24}{_gib(report[k])}")
    return report
