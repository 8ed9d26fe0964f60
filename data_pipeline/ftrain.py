"""Train (or quantize) a fastText classifier in a child process: `python -m data_pipeline.ftrain ARGS`.

Why a child process: fasttext-numpy2 0.10.4 leaves part of a freshly trained model uninitialised (heap memory
that malloc hands back unzeroed: its output matrix showed denormal garbage after a 1e-12 learning-rate run), so
training was non-deterministic and failed at random with "Encountered NaN" even at tiny learning rates, more often
in a process whose heap had seen heavy use. The parent starts this module with glibc's MALLOC_PERTURB_=255, which
makes every malloc return zero-filled memory: the model is then initialised as fastText intends, training is
deterministic (single thread, fixed seed) and the NaNs are gone. Loading and predicting are unaffected and stay in
the parent. ARGS is one JSON object, either {input, output, params} (train_supervised keyword arguments) or
{quantize_from, output, thread} (product-quantize a trained model to .ftz).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import fasttext   # C extension: loaded only where a classifier is trained or run

    args = json.loads(argv[0])
    if "quantize_from" in args:
        model = fasttext.load_model(args["quantize_from"])
        model.quantize(qnorm=True, retrain=False, thread=args.get("thread", 1))
    else:
        model = fasttext.train_supervised(input=args["input"], **args["params"])
    model.save_model(args["output"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except RuntimeError as e:  # fastText reports divergence as RuntimeError("Encountered NaN.")
        print(f"fasttext: {e}", file=sys.stderr)
        sys.exit(3)
