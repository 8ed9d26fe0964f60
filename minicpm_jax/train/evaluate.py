"""`minicpm eval`: held-out loss of a training run's checkpoint, per eval source and overall.

    minicpm eval --checkpoint runs/tiny --batches 32                  # every prepared eval source
    minicpm eval --checkpoint runs/tiny model.weight_quant=ternary    # the same weights, ternarised (PTQ)

The run's own config.yaml gives the model and data settings and its tokenizer/ copy is always used (so the ids are the
ones it trained with, even with another data_dir); `key=value` overrides change the rest for the evaluation only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import jax

from minicpm_jax.sharding import axis_rules, make_mesh
from minicpm_jax.train.checkpoint import load_run_params, run_paths
from minicpm_jax.train.config import load_config
from minicpm_jax.train.step import batch_sharding, make_eval_step


def eval_config(run_dir: str | Path, overrides: Sequence[str] = ()):
    """The run's ExperimentConfig with `overrides`, its tokenizer pinned to the run's own copy.

    Whatever data_dir an override names, ids must be the ones the weights were trained with: a data config without
    a tokenizer path would otherwise train a fresh tokenizer there and score the model on foreign ids.
    """
    tok = Path(run_dir) / "tokenizer"
    pinned = [f"data.tokenizer.path={tok}"] if tok.is_dir() else []
    return load_config(run_paths(run_dir)["config"], pinned + list(overrides))


def evaluate_run(run_dir: str | Path, *, batches: int = 32, sources: Optional[Sequence[str]] = None,
                 overrides: Sequence[str] = (), step: Optional[int] = None) -> dict:
    """{source: {"loss", "perplexity", "tokens"}} plus "all" (token-weighted), for the run's latest checkpoint."""
    from data_pipeline.pipeline import make_eval_iterator
    from data_pipeline.prepare import prepare_data
    from minicpm_jax.train.loop import eval_loss

    exp = eval_config(run_dir, overrides)
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    _, _, params = load_run_params(run_dir, step, mesh)
    cfg = exp.model_config()
    dcfg = exp.data_config()
    prepared = prepare_data(exp.data_dir, dcfg, progress=False)
    names = list(sources) if sources else sorted(prepared.shards("eval"))
    shape = (dcfg.batch_size, dcfg.seq_len)
    bsh = batch_sharding(mesh, shape)
    step_fn = jax.jit(make_eval_step(cfg, attention=exp.train.attention, loss_chunk=exp.train.loss_chunk_size))
    results, tot, n_all = {}, 0.0, 0.0
    with jax.set_mesh(mesh), axis_rules():
        for name in names:
            it = make_eval_iterator(prepared, dcfg, process_index=0, process_count=1, sources=[name])
            r = eval_loss(step_fn, params, it, batches, bsh, shape)
            if r["tokens"]:
                results[name] = {k: r[k] for k in ("loss", "perplexity", "tokens")}
                tot, n_all = tot + r["loss_sum"], n_all + r["tokens"]
    results["all"] = {"loss": tot / max(n_all, 1), "perplexity": math.exp(min(tot / max(n_all, 1), 50)),
                      "tokens": n_all}
    return results


def format_results(results: dict) -> str:
    lines = ["| eval source | loss | perplexity | tokens |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['loss']:.4f} | {r['perplexity']:.2f} | {int(r['tokens']):,} |")
    return "\n".join(lines)


def register(sub):
    p = sub.add_parser("eval", help="held-out loss / perplexity of a training run, per eval source")
    p.add_argument("--checkpoint", required=True, help="a training run directory")
    p.add_argument("--batches", type=int, default=32, help="eval batches per source (at most)")
    p.add_argument("--sources", default=None, help="comma-separated eval sources (default: all prepared)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("overrides", nargs="*", help="config overrides for the evaluation, e.g. model.weight_quant=ternary")

    def run(args):
        res = evaluate_run(args.checkpoint, batches=args.batches, overrides=args.overrides, step=args.step,
                           sources=args.sources.split(",") if args.sources else None)
        print(format_results(res))
        return 0

    p.set_defaults(func=run)
