"""The report as a PNG: an accuracy heatmap (context length x needle depth) per needle task, one bar per other task;
for a comparison of several models, bars per task grouped by model."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.records import write_figure


def plot_report(report: dict, path: str | Path) -> Path:
    """Write the figure to `path` (PNG); tasks without a numeric value are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = {k: r for k, r in report["tasks"].items() if r.get("kind") == "needle"}
    bars = {k: r for k, r in report["tasks"].items() if r.get("kind") != "needle" and isinstance(r.get("value"), float)}
    n = len(grids) + (1 if bars else 0)
    if n == 0:
        raise ValueError("the report has no task to plot")
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], grids.items()):
        lengths = list(r["grid"])
        depths = list(next(iter(r["grid"].values())))
        data = [[r["grid"][n_][d] for d in depths] for n_ in lengths]
        im = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{float(d):g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context tokens")
        ax.set_title(f"{name}: {r['value']:.2f}")
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if bars:
        ax = axes[0][-1]
        names = list(bars)
        ax.bar(range(len(names)), [bars[k]["value"] for k in names])
        ax.set_xticks(range(len(names)), [f"{k}\n{bars[k]['metric']}" for k in names], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title("tasks")
    return write_figure(fig, path, dpi=110, title=report.get("model", {}).get("model_source", ""))


def plot_comparison(comp: dict, path: str | Path) -> Path:
    """Write a grouped bar chart (PNG) of a comparison report (`compare.comparison_report`): per task (needle tasks
    per length too), one bar per model, so the cost of each export shows next to the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = comp["models"]
    labels = list(reports)
    rows: list[str] = []
    for r in reports.values():
        for name, t in r["tasks"].items():
            for row in [name] + [f"{name}@{n}" for n in t.get("by_length", {})]:
                if row not in rows:
                    rows.append(row)
    if not rows:
        raise ValueError("the comparison has no task to plot")

    def value(rep: dict, row: str) -> float:
        name, _, length = row.partition("@")
        t = rep["tasks"].get(name)
        if t is None:
            return float("nan")
        if not length:
            return float(t["value"])
        by_length = {str(n): v for n, v in t.get("by_length", {}).items()}   # int keys in memory, str from JSON
        return float(by_length.get(length, float("nan")))

    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(rows) * len(labels) / 2 + 2), 3.8))
    for j, k in enumerate(labels):
        ax.bar([i + j * width for i in range(len(rows))], [value(reports[k], r) for r in rows], width, label=k)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(rows))], rows, fontsize=7, rotation=30,
                  ha="right")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("reference: " + comp["reference"], fontsize=9)
    return write_figure(fig, path, dpi=110)
