"""`minicpm data stats`: the corpus manifest and the quality-score distribution, as text and a histogram PNG.

Accepts a corpus directory (manifest.json), a prepared workdir (prepared.json; scores read from its token shards)
or a scored JSONL file written by `minicpm data score`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from data_pipeline import records


def manifest_table(man: dict) -> str:
    lines = [f"{'source':24s} {'tier':6s} {'lang':4s} {'label':5s} {'docs':>7s} {'MB':>7s} {'train':>6s} {'eval':>6s}"]
    for name, m in man["sources"].items():
        lang = m["lang"] if isinstance(m["lang"], str) else "/".join(m["lang"])
        lines.append(f"{name:24s} {m['tier']:6s} {lang:4s} {m['label'] or '-':5s} {m['docs']:7d} "
                     f"{m['bytes'] / 1e6:7.2f} {m['split_docs'].get('train', 0):6d} {m['split_docs'].get('eval', 0):6d}"
                     + ("  held out" if m.get("heldout") else ""))
    t = man["total"]
    lines.append(f"{'total':24s} {'':6s} {'':4s} {'':5s} {t['docs']:7d} {t['bytes'] / 1e6:7.2f}")
    lines.append("by language: " + ", ".join(f"{k}: {v['docs']} docs, {v['bytes'] / 1e6:.2f} MB"
                                             for k, v in man["by_lang"].items()))
    if man.get("unavailable"):
        lines.append("unavailable: " + "; ".join(f"{k} ({v})" for k, v in man["unavailable"].items()))
    d = man.get("drops") or man.get("dropped") or {}
    if d.get("dropped"):
        lines.append(f"dropped input: {d['dropped']} (" + ", ".join(f"{k}={v}" for k, v in d["by_reason"].items()) + ")")
    return "\n".join(lines)


def collect_scores(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Optional[str]]]:
    """source -> scores, source -> seed label, from a prepared workdir or a scored JSONL."""
    scores: dict[str, list[float]] = defaultdict(list)
    labels: dict[str, Optional[str]] = {}
    if path.is_dir():
        man = records.read_json(path / "corpus" / "manifest.json")
        for split in ("train", "eval"):
            for shard in records.list_shards(path / "tokens" / split):
                for raw in records.read_shards([shard]):
                    rec = records.decode_record(raw)
                    if "score" in rec:
                        scores[rec["source"]].append(rec["score"])
        labels = {n: m.get("label") for n, m in man["sources"].items()}
    else:
        with open(path, encoding="utf-8") as f:
            for line in f:
                d = json.loads(line)
                if "score" in d:
                    src = d.get("source", "?")
                    scores[src].append(d["score"])
                    labels.setdefault(src, d.get("label"))
    return {k: np.asarray(v, np.float32) for k, v in scores.items()}, labels


def score_table(scores: dict[str, np.ndarray], threshold: float) -> str:
    lines = [f"{'source':24s} {'docs':>7s} {'mean':>6s} {'p10':>6s} {'p50':>6s} {'p90':>6s} {'kept':>6s}"]
    for name, s in sorted(scores.items()):
        if len(s):
            p10, p50, p90 = np.percentile(s, [10, 50, 90])
            lines.append(f"{name:24s} {len(s):7d} {s.mean():6.3f} {p10:6.3f} {p50:6.3f} {p90:6.3f} "
                         f"{(s >= threshold).mean():6.3f}")
    allv = np.concatenate([s for s in scores.values() if len(s)]) if scores else np.zeros(0)
    if len(allv):
        hist, edges = np.histogram(allv, bins=10, range=(0, 1))
        lines.append(f"all: {len(allv)} docs, kept at threshold {threshold}: {(allv >= threshold).mean():.3f}")
        width = max(hist.max(), 1)
        for h, a, b in zip(hist, edges[:-1], edges[1:]):
            lines.append(f"  [{a:.1f}, {b:.1f}) {h:7d} " + "#" * int(40 * h / width))
    return "\n".join(lines)


def histogram_png(scores: dict[str, np.ndarray], labels: dict[str, Optional[str]], threshold: float,
                  out: Path) -> Path:
    """Score histograms by seed label (hq / raw / unlabelled), with the threshold marked."""
    import matplotlib   # heavy, and only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt   # heavy, and only for the plot

    groups: dict[str, list[np.ndarray]] = defaultdict(list)
    for name, s in scores.items():
        groups[labels.get(name) or "unlabelled"].append(s)
    fig, ax = plt.subplots(figsize=(7, 4))
    for g, arrs in sorted(groups.items()):
        v = np.concatenate(arrs)
        ax.hist(v, bins=50, range=(0, 1), alpha=0.55, label=f"{g} ({len(v)} docs)")
    ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold}")
    ax.set_xlabel("UltraClean score P(high quality)")
    ax.set_ylabel("documents")
    ax.set_yscale("log")
    ax.legend()
    return records.write_figure(fig, out, dpi=110)


def stats(path: str | Path, png: Optional[str | Path] = None, threshold: Optional[float] = None) -> str:
    """The text report for `path`; writes the histogram PNG when scores exist (default beside the input)."""
    p = Path(path)
    out = []
    if p.is_dir() and (p / "prepared.json").exists():
        prep = records.read_json(p / "prepared.json")
        man = records.read_json(p / "corpus" / "manifest.json")
        threshold = threshold if threshold is not None else (prep.get("classifier") or {}).get("threshold", 0.5)
    elif p.is_dir() and (p / "manifest.json").exists():
        man = records.read_json(p / "manifest.json")
    elif p.is_file():
        man = None
    else:
        raise FileNotFoundError(f"{p}: not a corpus dir (manifest.json), prepared workdir (prepared.json) or a "
                                "scored JSONL file")
    threshold = 0.5 if threshold is None else threshold
    if man:
        out.append(manifest_table(man))
    if p.is_file() or (p / "prepared.json").exists():
        scores, labels = collect_scores(p)
        if scores:
            out.append("\nquality scores\n" + score_table(scores, threshold))
            png = Path(png) if png else (p / "score_hist.png" if p.is_dir() else p.with_suffix(".hist.png"))
            histogram_png(scores, labels, threshold, png)
            out.append(f"histogram: {png}")
    return "\n".join(out)
