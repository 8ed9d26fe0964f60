"""Several models scored on the same items, side by side: the JAX model and its GGUF exports (`minicpm eval
--checkpoint RUN --gguf A.gguf --gguf B.gguf`), so what an export (quantization) costs shows per task.

A comparison report is {"reference": label, "models": {label: one `suite.run_tasks` report}}; the first model is the
reference the differences are taken against.
"""

from __future__ import annotations

from typing import Optional, Sequence


def unique_labels(names: Sequence[str]) -> list[str]:
    """`names` with repeats numbered ("m", "m" -> "m", "m#2"), so every column has its own label."""
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out


def comparison_report(reports: dict[str, dict]) -> dict:
    """{"reference": first label, "models": reports, "mismatched_items": [tasks whose items differ]}."""
    labels = list(reports)
    if not labels:
        raise ValueError("comparison_report: no reports")
    mismatched = []
    for task in reports[labels[0]]["tasks"]:
        shas = {r["tasks"].get(task, {}).get("items_sha256") for r in reports.values()}
        if len(shas) > 1:
            mismatched.append(task)
    return {"reference": labels[0], "models": reports, "mismatched_items": mismatched}


def _rows(report: dict) -> dict[str, tuple[str, Optional[float]]]:
    """{row name: (metric, value)}: one row per task, one more per needle length / RULER length."""
    rows = {}
    for name, r in report["tasks"].items():
        rows[name] = (r["metric"], r["value"])
        for length in sorted({**r.get("by_length", {}), **r.get("skipped", {})}):
            if length in r.get("skipped", {}):      # a RULER length not run (the reason is in the report)
                rows[f"{name} @ {length}"] = ("skipped", None)
            else:
                rows[f"{name} @ {length}"] = ("accuracy" if "grid" in r else "score", r["by_length"][length])
    return rows


def format_comparison(comp: dict) -> str:
    """A markdown table: a row per task (and per length), a column per model (differences from the reference in
    parentheses), and the seconds each model took per task."""
    reports = comp["models"]
    labels = list(reports)
    ref = comp["reference"]
    per_model = {k: _rows(r) for k, r in reports.items()}
    names = list(dict.fromkeys(n for rows in per_model.values() for n in rows))
    head = "| task | metric | " + " | ".join(labels) + " | seconds (" + " / ".join(labels) + ") |"
    lines = [head, "|" + "---|" * (len(labels) + 3)]
    for name in names:
        metric = next(rows[name][0] for rows in per_model.values() if name in rows)
        cells = []
        for k in labels:
            v = per_model[k].get(name, (None, None))[1]
            r0 = per_model[ref].get(name, (None, None))[1]
            if v is None:
                cells.append("")
            elif k == ref or r0 is None:
                cells.append(f"{v:.4f}")
            else:
                cells.append(f"{v:.4f} ({v - r0:+.4f})")
        task = name.split(" @ ")[0]
        secs = " / ".join(f"{reports[k]['tasks'][task].get('seconds', 0):.1f}" if " @ " not in name and
                          task in reports[k]["tasks"] else "" for k in labels)
        lines.append(f"| {name} | {metric} | " + " | ".join(cells) + f" | {secs if ' @ ' not in name else ''} |")
    if comp.get("mismatched_items"):
        lines.append(f"\nWARNING: the models were asked different items in {comp['mismatched_items']} "
                     "(their tokenizers size the contexts differently); those columns do not compare item by item.")
    return "\n".join(lines)
