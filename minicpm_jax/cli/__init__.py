"""`minicpm`: the one command-line entry point, one module per command.

    minicpm train [--config FILE|NAME] [key=value ...] [--dry-run --fake-devices N]
    minicpm generate --checkpoint DIR | --gguf FILE | --preset tiny  --prompt TEXT
    minicpm eval --checkpoint RUN [--batches N] [key=value ...]
    minicpm export --checkpoint DIR --format gguf|hf ...
    minicpm data {build,train-tokenizer,train-classifier,score,stats,sft,prepare} ...
    minicpm sweep experiments/sweeps/NAME.yaml [--emit-commands]
    minicpm bench {sparse,train,data,edge}

This package is the only part of minicpm_jax that sees everything (model, training, export, data); library modules
expose functions, the commands here parse flags and call them.
"""

from __future__ import annotations

import argparse
import os
import sys

from minicpm_jax.cli import bench, data, export, generate, sweep, train
from minicpm_jax.cli import eval as eval_command   # (the module is named for its command; eval is a builtin)
from minicpm_jax.cli.common import USER_ERRORS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicpm", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (train, generate, eval_command, export, data, sweep, bench):
        command.register(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:   # one clear line, no traceback
        if os.environ.get("MINICPM_DEBUG"):
            raise
        print(f"minicpm {args.command}: error: {e}", file=sys.stderr)
        return 2
