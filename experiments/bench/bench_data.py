"""Data pipeline vs the tiny train step on this machine: is the input pipeline ever the bottleneck of the main job?

Run:  python experiments/bench/bench_data.py [--workdir runs/data] [--seconds 4] [--workers 0,1,2] [seq_len=256 ...]
      (`minicpm bench data` runs the same measurements; there the train step is timed in a child process.)

Prints, measured in one run (see data_pipeline/bench.py):
  * UltraClean scoring docs/s: Python preprocessing vs fastText prediction vs end to end;
  * grain pipeline tokens/s with 0, 1 and 2 worker processes, for the main job's path (token shards) and the full
    path (text shards scored and tokenized inside the pipeline);
  * the tiny train step's tokens/s at the same batch and sequence length (minicpm_jax.train.bench), and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from data_pipeline.cli import register_bench  # noqa: E402


def train_step_tokens_per_s(batch: int, seq: int) -> float:
    """Tokens/s of the tiny model's jitted train step (forward, backward, AdamW), after compilation."""
    from minicpm_jax.train.bench import CONFIGS, time_train_step

    r = time_train_step(CONFIGS["tiny"](), batch, seq, steps=3)
    print(f"tiny train step: {r['step_s']:.3f} s per {batch}x{seq} batch (compile {r['compile_s']:.1f} s)")
    return r["tokens_per_s"]


def main(argv=None) -> int:
    """`minicpm bench data` with the train step timed in this process (same flags and key=value overrides)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    register_bench(ap.add_subparsers(dest="bench", required=True), train_step=train_step_tokens_per_s)
    args = ap.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
