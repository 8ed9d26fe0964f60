"""Several runs' eval reports side by side: the table and heatmaps of a dense-vs-sparse comparison.

A report is what `minicpm eval --tasks heldout,niah_en,...` writes (`suite.run_tasks`, plus "heldout" when asked).
`table` gives one row per run: held-out loss (the mean over eval sources, weighted by tokens), then per needle task
the accuracy at each length, and the floors (copying the first 7-digit number of the prompt; guessing uniformly
among the prompt's needle numbers, 1 / (1 + distractors)). `plot` draws one length x depth heatmap per run and task.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional

from data_pipeline.records import write_figure


def merge(reports: list[dict]) -> dict:
    """One report from several of the same run that scored the same needle tasks at disjoint lengths (e.g. more
    items at 2K than at 8K): grids and per-length accuracies side by side; accuracy, the first-number floor and
    seconds pooled over all items."""
    out = {k: v for k, v in reports[0].items() if k != "tasks"}
    out["tasks"] = {}
    for name in reports[0]["tasks"]:
        parts = [r["tasks"][name] for r in reports]
        lengths = [n for p in parts for n in p["grid"]]
        if len(set(lengths)) < len(lengths):
            raise ValueError(f"merge: task {name} has a length in two reports ({lengths})")
        n = sum(p["n"] for p in parts)
        pooled = lambda key: sum(p[key] * p["n"] for p in parts) / n    # noqa: E731 item-weighted mean
        out["tasks"][name] = {**parts[0], "n": n, "value": pooled("value"),
                              "floor_first_number": pooled("floor_first_number"),
                              "grid": {k: v for p in parts for k, v in p["grid"].items()},
                              "by_length": {k: v for p in parts for k, v in p["by_length"].items()},
                              "seconds": sum(p.get("seconds", 0) for p in parts)}
        if all("digits_by_length" in p for p in parts):        # reports from before the digit diagnostics lack it
            out["tasks"][name].update(
                leading_digits=pooled("leading_digits"), digits_in_place=pooled("digits_in_place"),
                digits_by_length={k: v for p in parts for k, v in p["digits_by_length"].items()})
        else:                                                   # not pooled over every part: leave them out
            for key in ("leading_digits", "digits_in_place", "digits_by_length"):
                out["tasks"][name].pop(key, None)
        out["tasks"][name].pop("by_depth", None)       # depths differ between the parts
    return out


def heldout_loss(report: dict) -> Optional[float]:
    """Held-out loss over all eval sources, token-weighted (`evaluate_run`'s "all" row; None without one)."""
    return report.get("heldout", {}).get("all", {}).get("loss")


def random_floor(task: dict) -> float:
    """Expected accuracy of naming one of the prompt's needle numbers uniformly at random."""
    return 1.0 / (1 + task.get("distractors", 0))


def table(reports: Mapping[str, dict], tasks: tuple[str, ...] = ("niah_en", "niah_en_multikey"),
          distractors: Optional[Mapping[str, int]] = None, losses: Optional[Mapping[str, float]] = None) -> str:
    """Markdown: one row per run (`reports`: run name -> report), accuracy per needle task and length, floors.

    distractors: task -> distractor needles (for the random floor; default niah_*_multikey 3, else 0).
    losses: run name -> held-out loss, for reports without a heldout section (e.g. the run's own final eval)."""
    distractors, losses = dict(distractors or {}), dict(losses or {})
    lengths = sorted({int(n) for r in reports.values() for t in tasks if t in r["tasks"]
                      for n in r["tasks"][t]["by_length"]})
    cols = ["run", "held-out loss"] + [f"{t} @ {n}" for t in tasks for n in lengths] + ["seconds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in reports.items():
        loss = heldout_loss(r) if heldout_loss(r) is not None else losses.get(name)
        cells = [name, "—" if loss is None else f"{loss:.4f}"]
        for t in tasks:
            by_len = {int(k): v for k, v in r["tasks"].get(t, {}).get("by_length", {}).items()}
            cells += [f"{by_len[n]:.2f}" if n in by_len else "—" for n in lengths]
        cells.append(f"{sum(x.get('seconds', 0) for x in r['tasks'].values()):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(reports.values()))
    floor = ["floor: first number (pooled over lengths) / random", ""]
    for t in tasks:
        task = first["tasks"].get(t, {})
        d = distractors.get(t, 3 if t.endswith("multikey") else 0)
        f = task.get("floor_first_number")
        floor += [("—" if f is None else f"{f:.2f}") + f" / {random_floor({'distractors': d}):.2f}"] * len(lengths)
    lines.append("| " + " | ".join(floor + [""]) + " |")
    return "\n".join(lines)


def digits_table(reports: Mapping[str, dict], tasks: tuple[str, ...] = ("niah_en", "niah_en_multikey")) -> str:
    """Markdown: per run, task and length, the partial-credit diagnostics of `needle_score` as "leading digits right
    (of 7) / fraction of digits in place" (chance: 0.11 / 0.10); "—" where a report has none."""
    lengths = sorted({int(n) for r in reports.values() for t in tasks if t in r["tasks"]
                      for n in r["tasks"][t]["by_length"]})
    cols = ["run"] + [f"{t} @ {n}" for t in tasks for n in lengths]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in reports.items():
        cells = [name]
        for t in tasks:
            by_len = {int(k): v for k, v in r["tasks"].get(t, {}).get("digits_by_length", {}).items()}
            cells += [f"{by_len[n]['leading_digits']:.2f} / {by_len[n]['digits_in_place']:.2f}" if n in by_len
                      else "—" for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(reports: Mapping[str, dict], path: str | Path, tasks: tuple[str, ...] = ("niah_en", "niah_en_multikey"),
         title: str = "") -> Path:
    """PNG at `path`: a grid of accuracy heatmaps, one row per run, one column per needle task (context length x
    needle depth, 0..1)."""
    import matplotlib   # heavy, and only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt   # heavy, and only for the figure

    names = list(reports)
    fig, axes = plt.subplots(len(names), len(tasks), figsize=(3.6 * len(tasks), 2.6 * len(names)), squeeze=False)
    for i, name in enumerate(names):
        for j, t in enumerate(tasks):
            ax = axes[i][j]
            r = reports[name]["tasks"].get(t)
            if r is None:
                ax.axis("off")
                continue
            lengths = list(r["grid"])
            # lengths may have been scored at different depths (merged groups): a cell not scored stays blank
            depths = sorted({d for row in r["grid"].values() for d in row}, key=float)
            data = [[r["grid"][n].get(d, math.nan) for d in depths] for n in lengths]
            ax.imshow(data, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(depths)), [f"{float(d):g}" for d in depths], fontsize=7)
            ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
            for a, row in enumerate(data):
                for b, v in enumerate(row):
                    ax.text(b, a, "" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=7)
            ax.set_title(f"{name}: {t} {r['value']:.2f}", fontsize=8)
            if i == len(names) - 1:
                ax.set_xlabel("needle depth", fontsize=7)
            if j == 0:
                ax.set_ylabel("context tokens", fontsize=7)
    return write_figure(fig, path, dpi=80, title=title)
