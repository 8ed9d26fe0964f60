"""Evaluate every arm of the long-context sweep and write the combined table and heatmaps.

    minicpm sweep experiments/sweeps/long_context.yaml
    python experiments/long_context_eval.py [--sweep-dir runs/sweeps/long_context] [--grid "2048:0,0.5,1:2;8192:0.5:1"]
        [--start runs/retrieval_mid_tiny]

Each arm (a run directory under --sweep-dir) is scored by `minicpm eval` with its own attention (the run's
model.attention: dense, or InfLLM v2 with the run's variant) on the held-out needle tasks, one `minicpm eval` per
--grid group; the reports land in <arm>/eval/group-<g>/report.json (with the items and predictions), the
comparison in <sweep-dir>/comparison.md (accuracy, then the digit diagnostics), comparison.json and comparison.png.
The held-out loss is the run's own final eval (its eval sources at 2048 tokens, the same batches for every arm, with
the arm's attention);
`--heldout-batches N` scores every eval source with `minicpm eval` instead (slow on CPU: 12 sources x N batches).
`--start RUN` also scores the arms' common starting checkpoint on the same grid (its own attention), as the first
row, "start": what stage 3 added or lost. Its held-out loss is left out (its final eval is at its own length), and
so are the lengths past its max_position_embeddings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from minicpm_jax.evals import arm_reports
from minicpm_jax.train.config import load_config
from minicpm_jax.train.sweep import final_metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep-dir", default="runs/sweeps/long_context")
    p.add_argument("--tasks", default="niah_en,niah_en_multikey")
    p.add_argument("--grid", default="1024,2048:0,0.5,1:4;4096:0,0.5,1:1;8192:0.5:1",
                   help="needle items: 'LENGTHS:DEPTHS:SAMPLES' groups joined by ';' (one `minicpm eval` each; "
                        "fewer items at the long lengths, whose dense prefill is minutes per batch on CPU)")
    p.add_argument("--heldout-batches", type=int, default=0,
                   help="also score held-out loss per eval source with N batches (0: the run's final eval loss)")
    p.add_argument("--batch-size", type=int, default=4, help="decode rows per batch (8K dense prefill is big)")
    p.add_argument("--skip-existing", action="store_true",
                   help="reuse an arm's eval/group-<g>/report.json when present")
    p.add_argument("--arms", default=None, help="comma-separated arm directory names (default: every run)")
    p.add_argument("--start", default=None,
                   help="the arms' starting run, scored on the same grid as the row 'start' (reports under "
                        "<sweep-dir>/start-eval)")
    args = p.parse_args(argv)
    out = Path(args.sweep_dir)
    arms = sorted(d for d in out.iterdir() if (d / "config.yaml").is_file()
                  and (args.arms is None or d.name in args.arms.split(",")))
    if not arms:
        raise SystemExit(f"no runs under {args.sweep_dir}: run `minicpm sweep experiments/sweeps/long_context.yaml`")
    if args.start is not None and not (Path(args.start) / "config.yaml").is_file():
        raise SystemExit(f"--start {args.start}: not a run directory (no config.yaml)")
    tasks = tuple(t for t in args.tasks.split(",") if t)
    reports, seconds, losses = {}, {}, {}
    # (row name, run dir, where its reports go); the start row first, then the arms
    rows = ([("start", Path(args.start), out / "start-eval")] if args.start else []) + [
        (arm.name.split("_", 1)[1] if "_" in arm.name else arm.name, arm, arm / "eval") for arm in arms]
    for name, arm, eval_dir in rows:
        parts = []
        max_len = load_config(arm / "config.yaml").model_config().max_position_embeddings
        for g, group in enumerate(args.grid.split(";")):
            lengths, depths, samples = group.split(":")
            # the start may bound positions below the arms (they raise max_position_embeddings to probe 8K)
            fit = [n for n in lengths.split(",") if int(n) <= max_len]
            if not fit:
                print(f"[long_context_eval] {name}: {lengths} past its {max_len} positions; left out", flush=True)
                continue
            lengths = ",".join(fit)
            report = eval_dir / f"group-{g}" / "report.json"   # items/ and predictions beside it
            if not (args.skip_existing and report.is_file()):
                t0 = time.time()
                heldout = ("heldout",) if args.heldout_batches > 0 and g == 0 and name != "start" else ()
                cmd = [sys.executable, "-m", "minicpm_jax.cli", "eval", "--checkpoint", str(arm),
                       "--tasks", ",".join(heldout + tasks), "--lengths", lengths, "--depths", depths,
                       "--samples", samples, "--batches", str(max(args.heldout_batches, 1)),
                       "--batch-size", str(args.batch_size), "--report", str(report)]
                print(f"[long_context_eval] {arm.name}: {' '.join(cmd[2:])}", flush=True)
                subprocess.run(cmd, check=True)
                seconds[f"{name} {lengths}"] = round(time.time() - t0, 1)
            parts.append(json.loads(report.read_text()))
        reports[name] = arm_reports.merge(parts)                  # "000_dense" -> "dense"
        if name != "start":
            losses[name] = final_metrics(arm)["eval_loss"]
    md = (arm_reports.table(reports, tasks, losses=losses) + "\n\nPartial credit, leading digits right (of 7) / "
          "digits in place (chance 0.11 / 0.10):\n\n" + arm_reports.digits_table(reports, tasks))
    (out / "comparison.md").write_text(md + "\n")
    (out / "comparison.json").write_text(json.dumps(
        {"eval_seconds": seconds, "final_eval_loss": losses, "reports": reports}, indent=1) + "\n")
    png = arm_reports.plot(reports, out / "comparison.png", tasks, title="needle accuracy (held-out text), per arm")
    print(f"\n{md}\n\ntable: {out / 'comparison.md'}\nheatmaps: {png}\neval seconds: {seconds}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
