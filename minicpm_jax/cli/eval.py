"""`minicpm eval`: held-out loss / perplexity per eval source (the default), and evaluation tasks on a run or an
HF checkpoint: long-context needles, lm-eval tasks, HumanEval.

    minicpm eval --checkpoint runs/tiny --batches 32                  # held-out loss, every prepared eval source
    minicpm eval --checkpoint runs/tiny model.weight_quant=ternary    # the same weights, ternarised (PTQ)
    minicpm eval --checkpoint runs/tiny --tasks niah_en,niah_zh --lengths 1024,2048,4096
    minicpm eval --checkpoint path/to/hf --tasks minicpm_cloze_en,humaneval --limit 50
    minicpm eval --checkpoint runs/tiny --tasks heldout,niah_en_multikey --report runs/tiny/eval/report.json

Tasks (comma-separated): heldout (held-out loss; training runs only), niah_en, niah_zh, niah_en_multikey,
niah_zh_multikey, humaneval, and lm-eval task names (ours: minicpm_cloze_en, minicpm_niah_*; or lm-eval's own).
With --tasks the report is written as JSON (and a PNG beside it: needle heatmaps, a bar per other task) and printed
as a table with the seconds each task took.
"""

from __future__ import annotations

import sys
from pathlib import Path

from minicpm_jax.train.evaluate import evaluate_run, format_results


def register(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss of a run; long-context, lm-eval and HumanEval tasks",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a training run directory, or an HF directory (tasks only)")
    p.add_argument("--batches", type=int, default=32, help="held-out loss: eval batches per source (at most)")
    p.add_argument("--sources", default=None, help="held-out loss: comma-separated eval sources (default: all)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--tasks", default="heldout", help="comma-separated tasks (default: heldout)")
    p.add_argument("--lengths", default="1024,2048,4096", help="needle context lengths in tokens")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    p.add_argument("--samples", type=int, default=4, help="needle items per length x depth")
    p.add_argument("--limit", type=int, default=None, help="items per lm-eval task / HumanEval problems")
    p.add_argument("--batch-size", type=int, default=8, help="rows per scoring / decode batch")
    p.add_argument("--attention", default=None, choices=("auto", "dense", "sparse"),
                   help="default: the run's model.attention (auto for HF checkpoints)")
    p.add_argument("--seed", type=int, default=0, help="needle / cloze item seed")
    p.add_argument("--report", default=None,
                   help="JSON report path (default: <run>/eval/report.json, or ./eval-report.json for HF)")
    p.add_argument("overrides", nargs="*", help="held-out loss: config overrides, e.g. model.weight_quant=ternary")
    p.set_defaults(func=cmd_eval)


def _ints(flag: str, text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise ValueError(f"{flag} is empty")
    return vals


def _floats(flag: str, text: str) -> list[float]:
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise ValueError(f"{flag} must be numbers in [0, 1], got {text!r}")
    return vals


def cmd_eval(args) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty")
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    if tasks == ["heldout"]:                                  # the default: the table it always printed
        res, weights = evaluate_run(args.checkpoint, batches=args.batches, overrides=args.overrides, step=args.step,
                                    sources=args.sources.split(",") if args.sources else None)
        print(f"weights: {weights.describe()}", file=sys.stderr)
        print(format_results(res))
        return 0
    from minicpm_jax.evals.harness import MiniCPMLM
    from minicpm_jax.evals.plot import plot_report
    from minicpm_jax.evals.suite import SuiteSettings, format_table, run_tasks, write_report
    from minicpm_jax.weights import source_kind

    kind = source_kind(args.checkpoint)
    if "heldout" in tasks and kind != "run":
        raise ValueError(f"task heldout needs a training run directory (its prepared eval data); {args.checkpoint} "
                         "is an HF checkpoint")
    if args.overrides and (kind != "run" or "heldout" not in tasks):
        raise ValueError(f"config overrides {args.overrides} apply to the heldout task of a training run only")
    if args.samples < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--samples, --batch-size and --limit must be >= 1")
    report_path = Path(args.report) if args.report else (
        Path(args.checkpoint) / "eval" / "report.json" if kind == "run" else Path("eval-report.json"))
    settings = SuiteSettings(lengths=_ints("--lengths", args.lengths), depths=_floats("--depths", args.depths),
                             samples=args.samples, limit=args.limit, seed=args.seed,
                             out_dir=report_path.parent / "items")
    lm = MiniCPMLM(pretrained=args.checkpoint, step=args.step, attention=args.attention, batch_size=args.batch_size)
    print(f"weights: {lm.weights.describe()}", file=sys.stderr)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)   # noqa: E731
    report = run_tasks(lm, [t for t in tasks if t != "heldout"], settings, log=log)
    if "heldout" in tasks:
        res, _ = evaluate_run(args.checkpoint, batches=args.batches, overrides=args.overrides, step=lm.weights.step,
                              sources=args.sources.split(",") if args.sources else None)
        report["heldout"] = res
        print(format_results(res))
    print(format_table(report))
    write_report(report, report_path)
    png = plot_report(report, report_path.with_suffix(".png")) if report["tasks"] else None
    print(f"report: {report_path}" + (f"; plot: {png}" if png else "") + f"; items: {settings.out_dir}",
          file=sys.stderr)
    return 0
