"""Stage-1 check of the retrieval curriculum: does a run copy? Scores held-out copy items (their own seed) with the
run's own attention, at one or more span ranges (longer spans = copying from further back).

    python experiments/copy_probe.py runs/retrieval_warmup_tiny --pool-size 512 --spans 4:24,16:48
    python experiments/copy_probe.py runs/retrieval_warmup_tiny --pool-size 512 --spans 8:24:64:192   # with a gap

A range MIN:MAX copies spans of MIN..MAX tokens back to back; MIN:MAX:GMIN:GMAX puts GMIN..GMAX filler tokens
between the copies (copying from further back than the span length: only a content match does that).
`--filler text` makes the gap running prose instead of random ids, and `--lead MIN:MAX` puts MIN..MAX filler tokens
before the first copy (so it does not sit right after the BOS): together, a needle's setting.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax.numpy as jnp

from data_pipeline import copy_train
from data_pipeline.needle_train import training_sentences
from minicpm_jax.evals import copy_score
from minicpm_jax.model import forward
from minicpm_jax.weights import load_weights


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--pool-size", type=int, default=None, help="as `minicpm data copies --pool-size` (the run's)")
    p.add_argument("--spans", default="4:24", help="comma-separated MIN:MAX[:GMIN:GMAX] span (and gap) ranges")
    p.add_argument("--items", type=int, default=32)
    p.add_argument("--seed", type=int, default=99, help="item namespace (training records use 1)")
    p.add_argument("--filler", choices=copy_train.FILLERS, default="ids", help="the gap: random ids or prose")
    p.add_argument("--span-chars", default=None, help="spans from these characters (as `minicpm data copies`)")
    p.add_argument("--lead", default="0:0", help="MIN:MAX filler tokens before the first copy")
    p.add_argument("--paragraph", type=int, default=0, help="with --filler text: a new line every N sentences")
    args = p.parse_args(argv)
    lead = args.lead.split(":")
    if len(lead) != 2 or not all(x.isdigit() for x in lead):
        raise SystemExit(f"--lead: {args.lead!r} is not MIN:MAX")
    w = load_weights(args.run, step=args.step)
    pool = text_ids = None
    out = {"run": args.run, "step": w.step, "filler": args.filler, "lead": args.lead, "paragraph": args.paragraph}
    for rng in args.spans.split(","):
        parts = rng.split(":")
        if len(parts) not in (2, 4) or not all(x.isdigit() for x in parts):
            raise SystemExit(f"--spans: {rng!r} is not MIN:MAX or MIN:MAX:GMIN:GMAX")
        lo, hi, glo, ghi = [int(x) for x in parts] + [0, 0] * (len(parts) == 2)
        spec = copy_train.CopyTrainSpec(items=args.items, min_span=lo, max_span=hi, seed=args.seed, min_gap=glo,
                                        max_gap=ghi, filler=args.filler,
                                        min_lead=int(lead[0]), max_lead=int(lead[1]), paragraph=args.paragraph,
                                        span_chars=args.span_chars)
        if pool is None:        # the same for every range: built once
            pool, text_ids = copy_train.item_inputs(w.tokenizer, training_sentences(), spec, args.pool_size)
            out["pool"] = len(pool)
        items = [copy_train.build_item(pool, spec, i, w.tokenizer.bos_id, w.tokenizer.eos_id, text_ids)
                 for i in range(args.items)]
        ids, mask = copy_score.batch_items(items)
        logits = forward(w.params, w.cfg, jnp.asarray(ids), attention="dense")
        out[rng] = copy_score.score(logits, ids, mask)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
