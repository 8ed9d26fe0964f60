"""Data pipeline vs the tiny train step on this machine: is the input pipeline ever the bottleneck of the main job?

Run:  python experiments/bench/bench_data.py [--workdir runs/data] [--seconds 4] [--workers 0,1,2]
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
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from data_pipeline import bench  # noqa: E402
from data_pipeline.config import DataConfig  # noqa: E402
from data_pipeline.prepare import load_prepared, prepare_data  # noqa: E402


def train_step_tokens_per_s(batch: int, seq: int) -> float:
    """Tokens/s of the tiny model's jitted train step (forward, backward, AdamW), after compilation."""
    from minicpm_jax.train.bench import CONFIGS, time_train_step

    r = time_train_step(CONFIGS["tiny"](), batch, seq, steps=3)
    print(f"tiny train step: {r['step_s']:.3f} s per {batch}x{seq} batch (compile {r['compile_s']:.1f} s)")
    return r["tokens_per_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(bench.default_workdir()), help="prepared data (built if missing)")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--seq-len", type=int, default=256, help="default: experiments/configs/tiny.yaml")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    cfg = DataConfig(seq_len=args.seq_len, batch_size=args.batch_size)
    prepared = (load_prepared(args.workdir) if (Path(args.workdir) / "prepared.json").exists()
                else prepare_data(args.workdir, cfg, progress=False))
    bench.run(prepared, cfg, train_step=train_step_tokens_per_s, seconds=args.seconds,
              workers=tuple(int(w) for w in args.workers.split(",")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
