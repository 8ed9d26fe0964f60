"""Throughput accounting (model FLOPs, MFU against a measured peak) and metric sinks (JSONL + TensorBoard)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.records import write_figure
from minicpm_jax.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in matmuls per token: every layer matrix and the head (tied or not)."""
    h, f, l = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    return l * (2 * h * h + 2 * h * kv + 3 * h * f) + h * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int, sparse: bool = False) -> float:
    """Model FLOPs per trained token: 6 x matmul params (fwd + bwd) plus attention, 12 x L x hidden x the mean keys a
    query attends (QK^T and AV, 4 d per key forward, x3 for fwd + bwd; causal: (T+1)/2 keys).

    sparse (InfLLM v2): a query attends at most (topk + window blocks) x block_size keys, plus the forward-only
    block scoring against the kernel means (2 d per visible kernel). Upper bounds, so a sparse MFU is not understated
    by counting dense work it never does.
    """
    t = np.arange(1, seq_len + 1, dtype=np.float64)
    attn_keys, score = float(t.mean()), 0.0
    if sparse:
        sc = cfg.sparse_config
        attn_keys = float(np.minimum(t, (sc.topk_slots + sc.local_blocks) * sc.block_size).mean())
        score = 2.0 * cfg.hidden_size * float(np.maximum(0, (t - sc.kernel_size) // sc.kernel_stride + 1).mean())
    return 6.0 * matmul_params(cfg) + cfg.num_hidden_layers * (12.0 * cfg.hidden_size * attn_keys + score)


def measure_matmul_peak(dtype=jnp.float32, n: Optional[int] = None, repeats: int = 5) -> float:
    """FLOP/s of one large XLA matmul in `dtype` on the first local device (the denominator of MFU)."""
    platform = jax.devices()[0].platform
    n = n or (8192 if platform in ("gpu", "tpu") else 1024)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: (a @ b).sum())
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def peak_flops(dtype=jnp.float32) -> float:
    """The machine's FLOP/s for MFU: the best matmul rate over a few sizes on one device, times the device count.

    One size alone under-reads the peak on some CPUs (a busy moment, or a size the BLAS tiles badly), and an MFU
    above 100 % follows; the best of several is what the step can reach."""
    sizes = (1024, 2048) if jax.devices()[0].platform == "cpu" else (4096, 8192)
    return max(measure_matmul_peak(dtype, n) for n in sizes) * jax.device_count()


class MetricsWriter:
    """Process 0 writes `metrics.jsonl` and TensorBoard event files under `<run>/logs`; other processes no-op."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, purge_step: Optional[int] = None):
        """purge_step: a resumed run's first step; TensorBoard hides the events the interrupted run wrote from it."""
        self.enabled = enabled
        self.dir = Path(run_dir) / "logs"
        self._jsonl = None
        self._tb = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")
            from tensorboardX import SummaryWriter   # process 0 only; slow to import
            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge_step)

    def write(self, step: int, split: str, values: dict):
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, "time": time.time()}
        row.update({k: float(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self):
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "logs" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    """PNG of train and eval loss against step (later rows win when a resumed run repeated steps)."""
    import matplotlib   # heavy, and only for the plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt   # heavy, and only for the plot

    rows = read_metrics(run_dir)
    out = Path(out or Path(run_dir) / "loss.png")
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
        pts = {r["step"]: r["loss"] for r in rows if r["split"] == split and "loss" in r}
        if pts:
            steps = sorted(pts)
            ax.plot(steps, [pts[s] for s in steps], style, label=split, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    return write_figure(fig, out, dpi=120)


def to_python(tree) -> dict:
    return {k: float(np.asarray(v)) for k, v in jax.device_get(tree).items()}
