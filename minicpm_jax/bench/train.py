"""`minicpm bench train`: model FLOPs utilisation of the train step against this machine's measured matmul peak.

Both numbers are measured in the same run: the peak is the best of a few large XLA matmuls in the compute dtype,
and the train step (forward, backward, AdamW update; synthetic full-length documents) is timed after compilation.
MFU = model FLOPs per step (6 x matmul params x tokens + causal attention) / step time / peak.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.config import ModelConfig
from minicpm_jax.sharding import axis_rules, make_mesh
from minicpm_jax.train.config import OptimConfig
from minicpm_jax.train.metrics import peak_flops
from minicpm_jax.train.step import build_step

CONFIGS = {
    "tiny": lambda: ModelConfig.tiny(sparse_config=None),
    "100m": lambda: ModelConfig.tiny(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                     num_attention_heads=12, num_key_value_heads=4, dim_model_base=256.0,
                                     sparse_config=None),
    "0.5b": lambda: ModelConfig.minicpm4_0_5b(),
}


def time_train_step(cfg: ModelConfig, batch: int, seq: int, steps: int = 3, remat: str = "none") -> dict:
    """Compile and time the train step (built by `build_step`, as training builds it) on synthetic documents."""
    cfg = cfg.replace(remat_policy=remat)
    setup = build_step(cfg, make_mesh({"data": 1, "fsdp": -1, "tensor": 1}), (batch, seq),
                       optim=OptimConfig(warmup_steps=0, decay_steps=0), total_steps=100)
    state = setup.init_state(setup.init_params(0))
    step, mesh = setup.train_step, setup.mesh
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
    flops = setup.flops_per_token * batch * seq
    return {"params": cfg.param_count(), "tokens": batch * seq, "step_s": dt, "compile_s": compile_s,
            "tokens_per_s": batch * seq / dt, "flops_per_s": flops / dt, "loss": float(m["loss"])}


def run(configs: Sequence[str] = ("tiny", "100m"), dtype: Optional[str] = None, batch: Optional[int] = None,
        seq: int = 512, steps: int = 3) -> list[dict]:
    """Measure the peak, then each config's train step; print the table and return its rows."""
    platform = jax.devices()[0].platform
    dtype = dtype or ("float32" if platform == "cpu" else "bfloat16")
    peak = peak_flops(jnp.dtype(dtype))
    print(f"device: {jax.device_count()} x {jax.devices()[0].device_kind} ({platform}); compute dtype {dtype}")
    print(f"measured matmul peak: {peak / 1e9:,.1f} GFLOP/s\n")
    rows = []
    for name in configs:
        if name not in CONFIGS:
            raise ValueError(f"unknown bench config {name!r}; choose from {sorted(CONFIGS)}")
        cfg = CONFIGS[name]().replace(dtype=dtype)
        r = time_train_step(cfg, batch or (8 if name == "tiny" else 4), seq, steps)
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
