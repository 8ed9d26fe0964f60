"""`minicpm train --dry-run`: compile the train step for the configured mesh ahead of time and report what a launch
needs to know: per-device memory against the named accelerator, the largest values, the collectives and the FLOPs.

Nothing is allocated: parameters, optimizer state and the batch are ShapeDtypeStructs with their shardings, and
`jit(...).lower(...).compile()` runs the real partitioner, so a pod config can be checked on a laptop with fake CPU
devices (`--fake-devices N`) before launch. The compiler is XLA:CPU's: bfloat16 values it cannot update in place are
widened to float32 (e.g. the stack of saved layer inputs), so for bfloat16 runs the figure is an upper bound.
"""

from __future__ import annotations

import math
import re

import jax

from minicpm_jax.sharding import axis_rules, make_mesh
from minicpm_jax.train.collectives import collective_bytes
from minicpm_jax.train.config import ACCELERATORS, ExperimentConfig
from minicpm_jax.train.step import build_step

BUDGET = 0.9   # a config fits when its step needs at most this fraction of the accelerator's memory
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
          "f64": 8, "s64": 8, "u64": 8}
_VALUE = re.compile(r"^\s*(?:ROOT )?%?\S+ = (\w+)\[([\d,]*)\]")


def _gib(x) -> str:
    return f"{x / 2 ** 30:8.2f} GiB"


def largest_values(hlo_text: str, n: int = 8) -> list[tuple[int, str, str]]:
    """The n largest array values of a compiled (per-device) HLO module: (bytes, dtype[shape], op name), one row per
    dtype and shape (named by the first instruction that carries an op name)."""
    rows: dict[str, list] = {}
    for line in hlo_text.splitlines():
        m = _VALUE.match(line)
        if m is None or m.group(1) not in _BYTES:
            continue
        shape = f"{m.group(1)}[{m.group(2)}]"
        op = re.search(r'op_name="([^"]*)"', line)
        row = rows.setdefault(shape, [_BYTES[m.group(1)] * math.prod(int(d) for d in m.group(2).split(",") if d),
                                      shape, ""])
        if op and not row[2]:
            row[2] = op.group(1)
    return [tuple(r) for r in sorted(rows.values(), key=lambda r: -r[0])[:n]]


def dry_run(exp: ExperimentConfig, processes: int = 1) -> dict:
    """Lower and compile one train step; print and return the report (memory, fit, largest values, collectives).

    report["fits"] is None when the config names no accelerator, else whether the peak per-device bytes stay within
    BUDGET of its memory. report["involuntary_remat"]: SPMD had to replicate a tensor to re-shard it (it logs a
    warning); counted by the caller that can see the log (the CLI), None here.
    """
    cfg = exp.model_config()
    global_batch, seq_len = exp.data.batch_size * processes, exp.data.seq_len
    setup = build_step(cfg, make_mesh(exp.mesh.as_dict()), (global_batch, seq_len), attention=exp.model.attention,
                       optim=exp.optim, total_steps=exp.train.steps, micro_batches=exp.train.micro_batches,
                       loss_chunk=exp.train.loss_chunk_size)
    mesh = setup.mesh
    with jax.set_mesh(mesh), axis_rules():
        compiled = setup.train_step.lower(setup.abstract_state(), setup.abstract_batch()).compile()
    mem = compiled.memory_analysis()
    text = compiled.as_text()
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
        "collective_bytes": collective_bytes(text),
        "largest_values": largest_values(text),
        "accelerator": exp.mesh.accelerator,
    }
    report["peak_bytes_per_device"] = (report["argument_bytes"] + report["output_bytes"] + report["temp_bytes"]
                                       - report["alias_bytes"])
    cap = ACCELERATORS.get(exp.mesh.accelerator)
    report["capacity_bytes"] = cap
    report["fits"] = None if cap is None else report["peak_bytes_per_device"] <= BUDGET * cap
    _print(exp, cfg, report, global_batch, seq_len)
    return report


def _print(exp, cfg, r, global_batch, seq_len) -> None:
    print(f"dry run: {exp.name} — {cfg.param_count() / 1e9:.3f}B params on {r['devices']} devices, mesh {r['mesh']}")
    print(f"  global batch {global_batch} x {seq_len} = {global_batch * seq_len:,} tokens/step, "
          f"{r['model_tflops_per_step']:.1f} model TFLOPs/step ({r['attention']} attention, as training counts them), "
          f"micro-batches {exp.train.micro_batches}, remat {cfg.remat_policy}, dtype {cfg.dtype}/{cfg.param_dtype}")
    print("  per-device memory (XLA memory analysis of the compiled step):")
    for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes_per_device"):
        print(f"    {k:<24}{_gib(r[k])}")
    if r["capacity_bytes"] is None:
        print("    (mesh.accelerator is not set: no fit check)")
    else:
        frac = r["peak_bytes_per_device"] / r["capacity_bytes"]
        verdict = "fits" if r["fits"] else "DOES NOT FIT"
        print(f"    {r['accelerator']:<24}{_gib(r['capacity_bytes'])}   peak = {100 * frac:.1f} % of it: {verdict} "
              f"(budget {100 * BUDGET:.0f} %)")
    print("  largest values (per device):")
    for size, shape, name in r["largest_values"]:
        print(f"    {_gib(size)}  {shape:<28} {name[-90:]}")
    print("  collectives per step (bytes per device):")
    for kind, b in r["collective_bytes"].items():
        if b:
            print(f"    {kind:<24}{_gib(b)}")
