"""`minicpm bench train`: model FLOPs utilisation of the train step against this machine's measured matmul peak.

Both numbers are measured in the same run: the peak is the best of a few large XLA matmuls in the compute dtype,
and the train step (forward, backward, AdamW update; synthetic full-length documents) is timed after compilation.
MFU = model FLOPs per step (6 x matmul params x tokens + causal attention) / step time / peak.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.config import ModelConfig
from minicpm_jax.model import abstract_params, init_params, param_logical_axes
from minicpm_jax.sharding import axis_rules, make_mesh
from minicpm_jax.train.config import OptimConfig
from minicpm_jax.train.metrics import measure_matmul_peak, train_flops_per_token
from minicpm_jax.train.optimizer import make_optimizer
from minicpm_jax.train.step import TrainState, jit_train_step, make_train_step, state_shardings

CONFIGS = {
    "tiny": lambda: ModelConfig.tiny(sparse_config=None),
    "100m": lambda: ModelConfig.tiny(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, num_key_value_heads=4, dim_model_base=256.0,
                                     sparse_config=None),
    "0.5b": lambda: ModelConfig.minicpm4_0_5b(),
}


def peak_flops(dtype) -> float:
    """Best matmul FLOP/s over a few sizes (one device) times the device count."""
    sizes = (1024, 2048) if jax.devices()[0].platform == "cpu" else (4096, 8192)
    return max(measure_matmul_peak(dtype, n) for n in sizes) * jax.device_count()


def time_train_step(cfg: ModelConfig, batch: int, seq: int, steps: int = 3, remat: str = "none") -> dict:
    cfg = cfg.replace(remat_policy=remat)
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    ap = abstract_params(cfg)
    tx, sched = make_optimizer(OptimConfig(warmup_steps=0, decay_steps=0), cfg, ap, 100)
    st_sh = state_shardings(mesh, ap, param_logical_axes(cfg), tx)
    params = init_params(cfg, jax.random.key(0), mesh=mesh)
    state = TrainState(jnp.int32(0), params, jax.jit(tx.init, out_shardings=st_sh.opt_state)(params))
    step = jit_train_step(make_train_step(cfg, tx, sched), mesh, st_sh, (batch, seq))
    rng = np.random.default_rng(0)
    data = {"input_ids": rng.integers(3, cfg.vocab_size, (batch, seq)).astype(np.int32),
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "loss_mask": np.ones((batch, seq), np.int32)}
    with jax.set_mesh(mesh), axis_rules():
        t0 = time.perf_counter()
        state, m = step(state, data)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = step(state, data)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    flops = train_flops_per_token(cfg, seq) * batch * seq
    return {"params": cfg.param_count(), "tokens": batch * seq, "step_s": dt, "compile_s": compile_s,
            "tokens_per_s": batch * seq / dt, "flops_per_s": flops / dt, "loss": float(m["loss"])}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configs", default="tiny,100m", help=f"comma list of {sorted(CONFIGS)}")
    p.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    run(ap.parse_args(argv))


def run(args):
    platform = jax.devices()[0].platform
    dtype = args.dtype or ("float32" if platform == "cpu" else "bfloat16")
    peak = peak_flops(jnp.dtype(dtype))
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind} ({platform}); compute dtype {dtype}")
    print(f"measured matmul peak: {peak / 1e9:,.1f} GFLOP/s\n")
    rows = []
    for name in args.configs.split(","):
        cfg = CONFIGS[name]().replace(dtype=dtype)
        batch = args.batch or (8 if name == "tiny" else 4)
        r = time_train_step(cfg, batch, args.seq, args.steps)
        r["name"], r["mfu"] = name, r["flops_per_s"] / peak
        rows.append(r)
        print(f"  {name}: step {r['step_s']:.3f} s (compile {r['compile_s']:.1f} s)", flush=True)
    print("\n| config | params | tokens/step | step (s) | tokens/s | model GFLOP/s | peak GFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['params'] / 1e6:.1f}M | {r['tokens']:,} | {r['step_s']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | {r['flops_per_s'] / 1e9:,.1f} | {peak / 1e9:,.1f} | "
              f"{100 * r['mfu']:.1f}% |")
    return rows


def register_bench(sub):
    p = sub.add_parser("train", help="train-step MFU against the measured matmul peak (tiny and ~100M configs)")
    add_arguments(p)
    p.set_defaults(func=lambda args: run(args) and 0)


if __name__ == "__main__":
    main()
