"""Sweeps: a grid of config overrides around a base experiment.

    name: attention_topk
    base: experiments/configs/tiny.yaml
    overrides: [train.steps=60]                 # applied to every point
    grid:                                       # the cartesian product of these values
      train.attention: [dense, sparse]
      model.sparse_config.topk: [4, 8]
      width:                                    # an axis of bundles: each value sets several keys together
        - {_label: 128, model.hidden_size: 128, model.num_attention_heads: 2}
        - {_label: 256, model.hidden_size: 256, model.num_attention_heads: 4}

    exclude:                                    # grid points left out: each entry's keys all match (by label)
      - {train.attention: dense, model.sparse_config.topk: 8}

A grid value that is a mapping is a bundle of `key: value` overrides applied together (its axis name is only a
name; `_label` names the value in point names and tables, else its values joined by "-"). A value may refer to another
key with OmegaConf interpolation, e.g. `model.dim_model_base: ${model.hidden_size}` (standard parametrisation).

or, instead of `grid`, named `points` with their own overrides (arms that differ in several keys at once):

    points:
      dense: [model.attention=dense]
      sparse: [model.attention=sparse, model.sparse_config.variant=minicpm4.1]

Points run one after another as separate `minicpm train` processes (a failing point is reported, not fatal), each
writing `runs/sweeps/<name>/<point>`; `--emit-commands` prints one launch command per point for a cluster instead.
At the end a table of final metrics is printed and written (summary.md / summary.json) with a plot of eval loss.
"""

from __future__ import annotations

import itertools
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from data_pipeline.records import write_figure
from minicpm_jax.train.metrics import read_metrics


def load_sweep(path: str | Path) -> dict:
    path = Path(path)
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or ("grid" in spec) == ("points" in spec):
        raise ValueError(f"{path}: a sweep needs either a 'grid' mapping of config keys to value lists or a "
                         "'points' mapping of point names to override lists")
    spec.setdefault("name", path.stem)
    spec.setdefault("overrides", [])
    if "points" in spec:
        pts = spec["points"]
        if not isinstance(pts, dict) or not pts or any(
                not isinstance(v, list) or not all(isinstance(o, str) and "=" in o for o in v) for v in pts.values()):
            raise ValueError(f"{path}: 'points' must map point names to lists of key=value overrides, got {pts!r}")
        return spec
    grid = spec["grid"]
    if not isinstance(grid, dict) or not grid:
        raise ValueError(f"{path}: 'grid' must map config keys to non-empty lists")
    for k, v in grid.items():
        if not isinstance(v, list) or not v:
            raise ValueError(f"{path}: grid key {k!r} must have a non-empty list of values, got {v!r}")
        bundles = [isinstance(x, dict) for x in v]
        if any(bundles) and not all(bundles):
            raise ValueError(f"{path}: grid key {k!r} mixes bundles (mappings) and plain values: {v!r}")
        for b in (x for x in v if isinstance(x, dict)):
            if not [key for key in b if key != "_label"]:
                raise ValueError(f"{path}: grid key {k!r} has a bundle that sets nothing: {b!r}")
    exclude = spec.setdefault("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        raise ValueError(f"{path}: 'exclude' must be a list of non-empty mappings of grid keys to values")
    for e in exclude:
        unknown = set(e) - set(grid)
        if unknown:
            raise ValueError(f"{path}: exclude entry {e!r} names keys that are not in the grid: {sorted(unknown)}")
    return spec


def _fmt(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _label(v: Any) -> Any:
    """What a grid value is called in point names and tables (a bundle: its `_label`, or its values joined)."""
    if not isinstance(v, dict):
        return v
    return v.get("_label", "-".join(_fmt(x) for k, x in v.items() if k != "_label"))


def _overrides(key: str, v: Any) -> list[str]:
    """The `key=value` overrides one grid value stands for (a bundle: each of its keys)."""
    if not isinstance(v, dict):
        return [f"{key}={_fmt(v)}"]
    return [f"{k}={_fmt(x)}" for k, x in v.items() if k != "_label"]


def expand(spec: dict) -> list[dict]:
    """[{name, overrides: [...], values: {key: value or bundle label}}] for every grid point (named points: values
    {"point": name})."""
    if "points" in spec:
        points = []
        for i, (pname, own) in enumerate(spec["points"].items()):
            name = f"{i:03d}_{pname}".replace("/", "-").replace(" ", "")
            out = f"runs/sweeps/{spec['name']}/{name}"
            overrides = list(spec["overrides"]) + list(own) + [f"name={spec['name']}-{i:03d}", f"output_dir={out}"]
            points.append({"name": name, "values": {"point": pname}, "overrides": overrides, "output_dir": out})
        return points
    keys = list(spec["grid"])
    points = []
    for i, combo in enumerate(itertools.product(*(spec["grid"][k] for k in keys))):
        values = {k: _label(v) for k, v in zip(keys, combo)}
        if any(all(values[k] == v for k, v in e.items()) for e in spec.get("exclude", [])):
            continue
        tag = "_".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in values.items())
        name = f"{i:03d}_{tag}".replace("/", "-").replace(" ", "")
        out = f"runs/sweeps/{spec['name']}/{name}"
        overrides = list(spec["overrides"]) + [o for k, v in zip(keys, combo) for o in _overrides(k, v)] + [
            f"name={spec['name']}-{i:03d}", f"output_dir={out}"]
        points.append({"name": name, "values": values, "overrides": overrides, "output_dir": out})
    return points


def command(spec: dict, point: dict, extra: Sequence[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "minicpm_jax.cli", "train"]
    if spec.get("base"):
        cmd += ["--config", str(spec["base"])]
    return cmd + point["overrides"] + list(extra)


def final_metrics(run_dir: str | Path) -> dict:
    rows = read_metrics(run_dir)
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    out: dict[str, Optional[float]] = {"train_loss": train[-1]["loss"] if train else None,
                                       "eval_loss": evals[-1]["loss"] if evals else None,
                                       "steps": train[-1]["step"] if train else None}
    rates = [r["tokens_per_s"] for r in train[-20:] if "tokens_per_s" in r]
    out["tokens_per_s"] = sum(rates) / len(rates) if rates else None
    mfus = [r["mfu"] for r in train[-20:] if "mfu" in r]
    out["mfu"] = sum(mfus) / len(mfus) if mfus else None
    return out


def summary_table(spec: dict, points: list[dict], results: list[dict]) -> str:
    keys = list(spec["grid"]) if "grid" in spec else ["point"]
    cols = keys + ["status", "train_loss", "eval_loss", "tokens_per_s", "mfu"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for p, r in zip(points, results):
        cells = [_fmt(p["values"][k]) for k in keys] + [r["status"]]
        for c in ("train_loss", "eval_loss", "tokens_per_s", "mfu"):
            v = r.get(c)
            cells.append("—" if v is None else (f"{100 * v:.1f}%" if c == "mfu" else
                                               f"{v:,.0f}" if c == "tokens_per_s" else f"{v:.4f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(spec: dict, points: list[dict], out: Path) -> Path:
    import matplotlib   # heavy, and only for the plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt   # heavy, and only for the plot
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p in points:
        rows = [r for r in read_metrics(p["output_dir"]) if r["split"] == "eval"]
        if rows:
            ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], "o-", markersize=3,
                    label=", ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in p["values"].items()))
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.set_title(f"sweep {spec['name']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return write_figure(fig, out, dpi=120)


def run_sweep(path: str | Path, *, emit_commands: bool = False, launcher: str = "", extra: Sequence[str] = ()):
    spec = load_sweep(path)
    points = expand(spec)
    if emit_commands:
        for p in points:
            cmd = shlex.join(command(spec, p, extra))
            # "{}" in the launcher takes the command as one quoted argument (e.g. sbatch --wrap {})
            print(launcher.replace("{}", shlex.quote(cmd)) if "{}" in launcher else f"{launcher} {cmd}".strip())
        return []
    results = []
    for i, p in enumerate(points):
        print(f"\n[sweep {spec['name']}] point {i + 1}/{len(points)}: {p['values']}", flush=True)
        t0 = time.time()
        proc = subprocess.run(command(spec, p, extra))
        r = final_metrics(p["output_dir"])
        r["status"] = "ok" if proc.returncode == 0 else f"failed ({proc.returncode})"
        r["seconds"] = round(time.time() - t0, 1)
        results.append(r)
    out_dir = Path("runs/sweeps") / spec["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    table = summary_table(spec, points, results)
    (out_dir / "summary.md").write_text(table + "\n")
    (out_dir / "summary.json").write_text(json.dumps(
        [{"point": p["name"], "values": p["values"], **r} for p, r in zip(points, results)], indent=2) + "\n")
    plot = plot_sweep(spec, points, out_dir / "eval_loss.png")
    print(f"\n{table}\n\nsummary: {out_dir / 'summary.md'}\nplot:    {plot}", flush=True)
    return results
