"""`minicpm eval`: held-out loss / perplexity of a training run's checkpoint, per eval source.

    minicpm eval --checkpoint runs/tiny --batches 32                  # every prepared eval source
    minicpm eval --checkpoint runs/tiny model.weight_quant=ternary    # the same weights, ternarised (PTQ)
"""

from __future__ import annotations

import sys

from minicpm_jax.train.evaluate import evaluate_run, format_results


def register(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss / perplexity of a training run, per eval source",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a training run directory")
    p.add_argument("--batches", type=int, default=32, help="eval batches per source (at most)")
    p.add_argument("--sources", default=None, help="comma-separated eval sources (default: all prepared)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("overrides", nargs="*", help="config overrides for the evaluation, e.g. model.weight_quant=ternary")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    if args.batches < 1:
        raise ValueError(f"--batches must be >= 1, got {args.batches}")
    res, weights = evaluate_run(args.checkpoint, batches=args.batches, overrides=args.overrides, step=args.step,
                                sources=args.sources.split(",") if args.sources else None)
    print(f"weights: {weights.describe()}", file=sys.stderr)
    print(format_results(res))
    return 0
