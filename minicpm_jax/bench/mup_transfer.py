"""`minicpm bench mup-transfer`: does the best learning rate move with width? Reads a finished learning-rate
transfer sweep (`minicpm sweep experiments/sweeps/mup_transfer.yaml`) and writes the table and one plot: final
held-out loss vs peak_lr, one curve per width, a panel per parametrisation.

Each run directory is read on its own (its recorded config says width, parametrisation and lr), so a sweep still
running reads too. The best peak_lr of each (parametrisation, width) is the grid point of lowest loss, refined by a
parabola through it and its two neighbours in log2(lr) (when it is not at the grid's edge). Its drift is the slope of log2(best lr)
against log2(width), in octaves of lr per doubling of width: 0 = the optimum transfers; -1 = it halves each time the
width doubles (what standard parametrisation predicts for Adam's hidden matrices).

A (width, parametrisation) the sweep left out is taken from a μP run at that width whose width multiplier
(hidden_size / dim_model_base) is 1: there every parametrisation is the same model and optimiser, so the sweep runs
it once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from data_pipeline.records import write_figure
from minicpm_jax.train.config import load_config
from minicpm_jax.train.metrics import read_metrics
from minicpm_jax.train.sweep import final_metrics

def parametrisation(exp) -> str:
    """"mup-<rule>", "sp" (no μP lr scaling and dim_model_base = hidden_size), or "no-mup-lr" (neither)."""
    if exp.optim.mup:
        return f"mup-{exp.optim.mup_rule}"
    return "sp" if exp.model_config().width_mult == 1.0 else "no-mup-lr"


def read_points(sweep_dir: str | Path) -> list[dict]:
    """[{param, width, lr, loss, status, width_mult}], one per finished or diverged run directory of the sweep, from
    each run's recorded config.yaml and metrics (so a sweep still running, or cut short, reads too).

    loss: the final eval loss of a run that reached its last step (None when it diverged)."""
    out = []
    for run_dir in sorted(p for p in Path(sweep_dir).iterdir() if (p / "config.yaml").exists()):
        exp = load_config(run_dir / "config.yaml", recorded=True)
        cfg = exp.model_config()
        m = final_metrics(run_dir)
        done = m["steps"] == exp.train.steps and m["eval_loss"] is not None and math.isfinite(m["eval_loss"])
        rows = [r for r in read_metrics(run_dir) if r["split"] in ("train", "eval")]
        diverged = any(not math.isfinite(r["loss"]) for r in rows)
        if done or diverged:                     # an unfinished run (still going, or killed) is not a data point
            out.append({"param": parametrisation(exp), "width": cfg.hidden_size, "lr": exp.optim.peak_lr,
                        "loss": m["eval_loss"] if done else None, "status": "ok" if done else "diverged",
                        "width_mult": cfg.width_mult})
    return out


def fill_shared(points: list[dict]) -> list[dict]:
    """Add the (param, width, lr) cells the sweep left out where a μP run had width_mult 1 (width = its
    dim_model_base): there every μP rule and SP are the same model and optimiser. (An SP run always has width_mult 1
    and stands for nothing else: μP differs from it at any other width.)"""
    params = list(dict.fromkeys(p["param"] for p in points))
    have = {(p["param"], p["width"], p["lr"]) for p in points}
    extra = []
    for p in points:
        if p["width_mult"] == 1.0 and p["param"].startswith("mup-"):
            extra += [{**p, "param": q, "shared_from": p["param"]} for q in params
                      if (q, p["width"], p["lr"]) not in have]
    return points + extra


def best_lr(lrs: list[float], losses: list[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """(grid argmin lr, parabola-refined lr in log2 space; the grid lr at an edge). None when nothing finished."""
    ok = [(lr, l) for lr, l in sorted(zip(lrs, losses)) if l is not None]
    if not ok:
        return None, None
    i = min(range(len(ok)), key=lambda j: ok[j][1])
    grid = ok[i][0]
    if i == 0 or i == len(ok) - 1:
        return grid, grid
    x = np.log2([ok[j][0] for j in (i - 1, i, i + 1)])
    y = np.array([ok[j][1] for j in (i - 1, i, i + 1)])
    a, b, _ = np.polyfit(x, y, 2)
    refined = float(np.clip(-b / (2 * a), x[0], x[2])) if a > 0 else float(x[1])
    return grid, float(2.0 ** refined)


def optima(points: list[dict]) -> list[dict]:
    """[{param, width, grid_lr, lr, loss}] per parametrisation and width."""
    out = []
    for param in dict.fromkeys(p["param"] for p in points):
        for w in sorted({p["width"] for p in points if p["param"] == param}):
            sel = sorted((p["lr"], p["loss"]) for p in points if (p["param"], p["width"]) == (param, w))
            grid, lr = best_lr([s[0] for s in sel], [s[1] for s in sel])
            finite = [s[1] for s in sel if s[1] is not None]
            out.append({"param": param, "width": w, "grid_lr": grid, "lr": lr, "loss": min(finite) if finite else None})
    return out


def drift(best: list[dict], param: str) -> Optional[float]:
    """Least-squares slope of log2(best lr) vs log2(width): octaves the optimum moves per doubling of width."""
    sel = [(b["width"], b["lr"]) for b in best if b["param"] == param and b["lr"] is not None]
    if len(sel) < 2:
        return None
    return float(np.polyfit(np.log2([s[0] for s in sel]), np.log2([s[1] for s in sel]), 1)[0])


def table(points: list[dict]) -> str:
    """Markdown: loss per (parametrisation, width) x lr, the best lr (grid and refined), and the drift."""
    lrs = sorted({p["lr"] for p in points})
    best = optima(points)
    head = "| param | width | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr (grid) | best lr (fit) |"
    lines = [head, "|" + "---|" * (len(lrs) + 4)]
    for b in best:
        got = {p["lr"]: p for p in points if (p["param"], p["width"]) == (b["param"], b["width"])}
        cells = []
        for lr in lrs:
            p = got.get(lr)
            cells.append("—" if p is None else "diverged" if p["loss"] is None else
                         f"{p['loss']:.3f}" + ("*" if p.get("shared_from") else ""))
        g = "—" if b["grid_lr"] is None else f"{b['grid_lr']:g}"
        f = "—" if b["lr"] is None else f"{b['lr']:.3g}"
        lines.append(f"| {b['param']} | {b['width']} | " + " | ".join(cells) + f" | {g} | {f} |")
    lines.append("")
    lines.append("| param | best-lr drift per doubling of width (octaves; 0 = transfers) |")
    lines.append("|---|---|")
    for param in dict.fromkeys(b["param"] for b in best):
        d = drift(best, param)
        lines.append(f"| {param} | {'—' if d is None else f'{d:+.2f}'} |")
    if any(p.get("shared_from") for p in points):
        lines.append("\n\\* width multiplier 1: the same run as the other parametrisations at this width.")
    return "\n".join(lines)


def plot(points: list[dict], out: str | Path, title: str = "") -> Path:
    """Loss vs peak_lr (log2 axis), one curve per width, one panel per parametrisation; the best lr marked."""
    import matplotlib                      # heavy, and only for the plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt        # heavy, and only for the plot
    params = list(dict.fromkeys(p["param"] for p in points))
    widths = sorted({p["width"] for p in points})
    best = optima(points)
    finite = [p["loss"] for p in points if p["loss"] is not None]
    fig, axes = plt.subplots(1, len(params), figsize=(4.0 * len(params), 3.6), sharey=True, squeeze=False)
    for ax, param in zip(axes[0], params):
        for ci, w in enumerate(widths):
            sel = sorted((p["lr"], p["loss"]) for p in points
                         if (p["param"], p["width"]) == (param, w) and p["loss"] is not None)
            if not sel:
                continue
            ax.plot(*zip(*sel), "o-", color=f"C{ci}", markersize=4, label=f"width {w}")
            b = next(b for b in best if (b["param"], b["width"]) == (param, w))
            if b["lr"] is not None:
                ax.axvline(b["lr"], color=f"C{ci}", alpha=0.4, linestyle=":")
        d = drift(best, param)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("peak_lr")
        ax.set_title(f"{param}" + ("" if d is None else f"  (best lr drift {d:+.2f} oct/doubling)"), fontsize=9)
        ax.grid(alpha=0.3, which="both")
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_ylim(lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo))
    axes[0][0].set_ylabel("final held-out loss")
    axes[0][0].legend(fontsize=8)
    return write_figure(fig, out, dpi=90, title=title)


def run(sweep_dir: str | Path = "runs/sweeps/mup_transfer", out: Optional[str | Path] = None) -> str:
    """Read the sweep, print and write the table (transfer.md) and the plot (transfer.png) into the sweep dir."""
    sweep_dir = Path(sweep_dir)
    points = fill_shared(read_points(sweep_dir))
    text = table(points)
    runs = [p for p in points if not p.get("shared_from")]
    note = f"{sum(p['loss'] is not None for p in runs)} of {len(runs)} runs finished"
    png = plot(points, out or sweep_dir / "transfer.png", title=f"learning-rate transfer ({sweep_dir.name}; {note})")
    (sweep_dir / "transfer.md").write_text(text + "\n")
    print(f"{text}\n\n{note}\ntable: {sweep_dir / 'transfer.md'}\nplot:  {png}", flush=True)
    return text
