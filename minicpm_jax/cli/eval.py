"""`minicpm eval`: held-out loss / perplexity per eval source (the default), and evaluation tasks on a run, an
HF checkpoint or an exported GGUF: long-context needles, lm-eval tasks, HumanEval.

    minicpm eval --checkpoint runs/tiny --batches 32                  # held-out loss, every prepared eval source
    minicpm eval --checkpoint runs/tiny model.weight_quant=ternary    # the same weights, ternarised (PTQ)
    minicpm eval --checkpoint runs/tiny --tasks niah_en,niah_zh --lengths 1024,2048,4096
    minicpm eval --checkpoint path/to/hf --tasks minicpm_cloze_en,humaneval --limit 50
    minicpm eval --checkpoint runs/tiny --tasks heldout,niah_en_multikey --report runs/tiny/eval/report.json
    minicpm eval --gguf runs/tiny/export/model-q8_0.gguf --tasks niah_en,minicpm_cloze_en      # llama.cpp
    minicpm eval --checkpoint runs/tiny --gguf m-f32.gguf --gguf m-q8_0.gguf --tasks niah_en  # side by side
    minicpm eval --checkpoint runs/tiny --tasks heldout,niah_en mesh.data=2 mesh.tensor=2     # on a device mesh
    minicpm eval --checkpoint runs/tiny --tasks niah_en --fake-devices 4 mesh.data=2 mesh.tensor=2   # CPU check

Tasks (comma-separated): heldout (held-out loss; training runs only), niah_en, niah_zh, niah_en_multikey,
niah_zh_multikey, niah_{en,zh}_multivalue, niah_{en,zh}_multiquery, humaneval, and lm-eval task names (ours:
minicpm_cloze_en, minicpm_niah_*; or lm-eval's own).
With --tasks the report is written as JSON (and a PNG beside it: needle heatmaps, a bar per other task) and printed
as a table with the seconds each task took.

--gguf FILE (repeatable) scores an exported GGUF through llama.cpp (the lm-eval backend `minicpm_gguf`, with the
file's own tokenizer) on the same items. With --checkpoint as well, or several files, every model is scored and the
table has a column per model (the first, the JAX model when given, is the reference: the others show their
difference from it), so what each quantization costs shows per task; the JSON then holds every model's report.

Mesh: `mesh.data=N mesh.fsdp=N mesh.tensor=N` (the experiment config's keys; axes not named are data 1, fsdp -1 =
the rest, tensor 1) run the JAX model's tasks and the held-out loss on that device mesh; default: the local devices
as one fsdp axis. `--fake-devices N` makes N CPU devices (checks without accelerators).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minicpm_jax.cli.common import set_fake_devices
from minicpm_jax.train.evaluate import evaluate_run, format_results


def register(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss of a run; long-context, lm-eval and HumanEval tasks",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a training run directory, or an HF directory (tasks only)")
    p.add_argument("--gguf", action="append", default=[], metavar="FILE",
                   help="an exported GGUF scored through llama.cpp on the same items (repeatable; beside --checkpoint "
                        "the table shows every model side by side)")
    p.add_argument("--gguf-threads", type=int, default=None, help="llama.cpp threads (default: all cores)")
    p.add_argument("--fake-devices", type=int, default=None, help="use N fake CPU devices (mesh checks, tests)")
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
    p.add_argument("overrides", nargs="*",
                   help="mesh.data=N mesh.fsdp=N mesh.tensor=N: the device mesh of the JAX model (tasks and held-out "
                        "loss); other config overrides apply to held-out loss, e.g. model.weight_quant=ternary")
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


def split_mesh(overrides) -> tuple[dict[str, int] | None, list[str]]:
    """({axis: size} of the `mesh.<axis>=N` overrides, or None; the other overrides)."""
    mesh, rest = {}, []
    for o in overrides:
        key, eq, value = o.partition("=")
        if key.startswith("mesh.") and key != "mesh.accelerator":
            if not eq:
                raise ValueError(f"override {o!r}: expected mesh.<axis>=<size>")
            try:
                mesh[key[len("mesh."):]] = int(value)
            except ValueError:
                raise ValueError(f"override {o!r}: the mesh size must be an integer") from None
        else:
            rest.append(o)
    return mesh or None, rest


def _heldout(args, overrides, mesh, step=None) -> tuple[dict, int]:
    """(held-out loss table, the checkpoint step it used), printed as the table `minicpm eval` always printed."""
    res, weights = evaluate_run(args.checkpoint, batches=args.batches, overrides=overrides, step=step,
                                sources=args.sources.split(",") if args.sources else None, mesh=mesh)
    print(f"weights: {weights.describe()}" + (f" on mesh {mesh}" if mesh else ""), file=sys.stderr)
    print(format_results(res))
    return res, weights.step


def cmd_eval(args) -> int:
    set_fake_devices(args.fake_devices)          # before JAX makes its first array
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty")
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    if not args.checkpoint and not args.gguf:
        raise ValueError("give --checkpoint RUN_OR_HF_DIR and/or --gguf FILE")
    mesh, overrides = split_mesh(args.overrides)
    if tasks == ["heldout"] and not args.gguf:               # the default: the table it always printed
        if not args.checkpoint:
            raise ValueError("task heldout needs a training run directory (--checkpoint RUN)")
        _heldout(args, overrides, mesh, args.step)
        return 0
    from minicpm_jax.evals.compare import comparison_report, format_comparison, unique_labels
    from minicpm_jax.evals.plot import plot_comparison, plot_report
    from minicpm_jax.evals.suite import SuiteSettings, format_table, run_tasks, tokenizer_dir, write_report
    from minicpm_jax.export.llamacpp import check_gguf
    from minicpm_jax.weights import source_kind

    for f in args.gguf:                  # a missing or damaged file fails now, naming it, before any model loads
        check_gguf(f)
    kind = source_kind(args.checkpoint) if args.checkpoint else None
    if "heldout" in tasks and kind != "run":
        raise ValueError("task heldout needs a training run directory (its prepared eval data); "
                         + (f"{args.checkpoint} is an HF checkpoint" if kind else "give --checkpoint RUN"))
    if overrides and (kind != "run" or "heldout" not in tasks):
        raise ValueError(f"config overrides {overrides} apply to the heldout task of a training run only")
    if mesh and not args.checkpoint:
        raise ValueError(f"mesh overrides {mesh} place the JAX model (--checkpoint); llama.cpp runs a GGUF on the "
                         "host's cores (--gguf-threads)")
    if args.samples < 1 or args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--samples, --batch-size and --limit must be >= 1")
    lengths, depths = _ints("--lengths", args.lengths), _floats("--depths", args.depths)
    report_path = Path(args.report) if args.report else (
        Path(args.checkpoint) / "eval" / "report.json" if kind == "run" else Path("eval-report.json"))
    items_dir = report_path.parent / "items"
    log = lambda msg: print(msg, file=sys.stderr, flush=True)   # noqa: E731
    names = (["jax"] if args.checkpoint else []) + [Path(f).stem for f in args.gguf]
    labels = unique_labels(names)
    several = len(labels) > 1
    # held-out loss first: a run whose prepared data cannot be found fails before the (long) tasks run
    heldout, step = _heldout(args, overrides, mesh, args.step) if "heldout" in tasks else (None, args.step)
    reports: dict[str, dict] = {}
    ruler_tokenizer = None       # the JAX model's, for every model: RULER items then match across models
    for label, source in zip(labels, ([args.checkpoint] if args.checkpoint else []) + list(args.gguf)):
        lm = _load(args, label, source, mesh, step)      # the step held-out loss used (newest when not given)
        if label == "jax":
            ruler_tokenizer = tokenizer_dir(lm)
        settings = SuiteSettings(lengths=lengths, depths=depths, samples=args.samples, limit=args.limit,
                                 seed=args.seed, out_dir=items_dir / label if several else items_dir,
                                 ruler_tokenizer=ruler_tokenizer)
        log(f"eval: model {label}: {lm.get_model_info()['model_source']}")
        reports[label] = run_tasks(lm, [t for t in tasks if t != "heldout"], settings, log=log)
        del lm                           # one model in memory at a time
    if not several:
        report = reports[labels[0]]
        if heldout is not None:
            report["heldout"] = heldout
        print(format_table(report))
        write_report(report, report_path)
        png = plot_report(report, report_path.with_suffix(".png")) if report["tasks"] else None
    else:
        report = comparison_report(reports)
        if heldout is not None:
            report["heldout"] = {"jax": heldout}
        print(format_comparison(report))
        write_report(report, report_path)
        has_tasks = bool(reports[labels[0]]["tasks"])
        png = plot_comparison(report, report_path.with_suffix(".png")) if has_tasks else None
    print(f"report: {report_path}" + (f"; plot: {png}" if png else "") + f"; items: {items_dir}", file=sys.stderr)
    return 0


def _load(args, label: str, source: str, mesh, step):
    """The lm-eval model for one source: the JAX backend for --checkpoint, llama.cpp for a --gguf file."""
    if label == "jax":
        from minicpm_jax.evals.harness import MiniCPMLM

        lm = MiniCPMLM(pretrained=source, step=step, attention=args.attention, batch_size=args.batch_size,
                       mesh=mesh)
        print(f"weights: {lm.weights.describe()}" + (f" on mesh {dict(lm.mesh.shape)}" if lm.mesh else ""),
              file=sys.stderr)
        return lm
    from minicpm_jax.evals.gguf_harness import GGUFLM

    return GGUFLM(pretrained=source, n_threads=args.gguf_threads, batch_size=args.batch_size)
