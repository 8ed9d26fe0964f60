"""Train (and optionally quantize) a fastText classifier in a fresh process: `python -m data_pipeline.ftrain ARGS`.

Why a separate process: with fasttext-numpy2 0.10.4, `train_supervised` run inside a process whose heap has seen
heavy use (tokenizing a corpus) fails at random with "Encountered NaN" even at tiny learning rates, while the
same file always trains in a fresh process; predictions are unaffected. So training runs here, on a clean heap,
single-threaded for a deterministic model. ARGS is one JSON object, either {input, output, params}
(train_supervised keyword arguments) or {quantize_from, output, thread} (product-quantize a trained model to .ftz).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    import fasttext

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
