"""Edge benchmark: llama.cpp (GGUF f16 / q8_0 / q4_0) vs JAX decode on this CPU, for a MiniCPM4-0.5B-shaped model.

    python experiments/bench/bench_edge.py [--preset 0.5b] [--qtypes f16,q8_0,q4_0] [--threads 2]
    # same as: minicpm bench edge ...

Prints file size, export time, llama.cpp prefill and decode tokens/s, and the JAX CPU decode tokens/s of the same
random weights, measured in one run (see minicpm_jax/export/bench.py). Takes a few minutes at 0.5B on 2 cores.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))      # run from a checkout without installing

from minicpm_jax.export import bench  # noqa: E402


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
