"""`minicpm sweep`: run (or print launch commands for) a grid of experiment overrides."""

from __future__ import annotations

from minicpm_jax.train.sweep import run_sweep


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run (or print launch commands for) a grid of experiment overrides")
    p.add_argument("sweep", help="sweep YAML: base config, grid of keys, metrics to report")
    p.add_argument("--emit-commands", action="store_true", help="print one launch command per point, run nothing")
    p.add_argument("--launcher", default="",
                   help="prefix for emitted commands, or a template where {} is the quoted command (sbatch --wrap {})")
    p.add_argument("overrides", nargs="*", help="overrides applied to every point")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args) -> int:
    run_sweep(args.sweep, emit_commands=args.emit_commands, launcher=args.launcher, extra=args.overrides)
    return 0
