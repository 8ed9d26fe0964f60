"""Held-out loss of a training run's checkpoint, per eval source and overall (what `minicpm eval` prints).

The run's own config.yaml gives the model and data settings and its tokenizer/ copy is always used (so the ids are the
ones it trained with, even with another data_dir); `key=value` overrides change the rest for the evaluation only,
e.g. `model.weight_quant=ternary` scores the same weights ternarised.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import jax

from data_pipeline.pipeline import make_eval_iterator
from data_pipeline.prepare import prepare_data
from minicpm_jax.checkpoint import run_paths
from minicpm_jax.sharding import axis_rules, make_mesh, mesh_from_sizes
from minicpm_jax.train.config import ExperimentConfig, load_config
from minicpm_jax.train.loop import eval_loss
from minicpm_jax.train.step import build_step
from minicpm_jax.weights import Weights, load_weights


def eval_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The run's ExperimentConfig with `overrides`, its tokenizer pinned to the run's own copy.

    Whatever data_dir an override names, ids must be the ones the weights were trained with: a data config without
    a tokenizer path would otherwise train a fresh tokenizer there and score the model on foreign ids.
    """
    tok = Path(run_dir).resolve() / "tokenizer"
    pinned = [f"data.tokenizer.path={tok}"] if tok.is_dir() else []
    exp = load_config(run_paths(run_dir)["config"], pinned + list(overrides), recorded=True)
    if not Path(exp.data_dir).is_absolute() and not (Path(exp.data_dir) / "prepared.json").is_file():
        # runs record absolute paths now; an older run's relative data_dir would silently rebuild the corpus here
        raise ValueError(f"{run_dir}: its data_dir {exp.data_dir!r} is relative and holds no prepared data from "
                         f"{Path.cwd()}; run from the directory it was trained in, or pass data_dir=<path>")
    return exp


def evaluate_run(run_dir: str | Path, *, batches: int = 32, sources: Optional[Sequence[str]] = None,
                 overrides: Sequence[str] = (), step: Optional[int] = None,
                 mesh: Optional[dict[str, int]] = None) -> tuple[dict, Weights]:
    """({source: {"loss", "perplexity", "tokens"}} plus "all" (token-weighted), the weights used) for a checkpoint
    of the run (the newest restorable one unless `step`).

    mesh: {axis: size} as the config's `mesh.*` keys (`sharding.mesh_from_sizes`); default: as many local devices
    as split the eval batch evenly, as one fsdp axis. The run's recorded mesh is not used: it is sized for the
    machine it trained on."""
    exp = eval_config(run_dir, overrides)
    dcfg = exp.data
    if mesh is not None:
        mesh = mesh_from_sizes(mesh, devices=jax.local_devices())
    else:   # 8 devices and a batch of 4 use 4 of them
        mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1},
                         devices=jax.local_devices()[:math.gcd(dcfg.batch_size, jax.local_device_count())])
    weights = load_weights(run_dir, step=step, mesh=mesh)
    prepared = prepare_data(exp.data_dir, dcfg, progress=False)
    names = list(sources) if sources else sorted(prepared.shards("eval"))
    shape = (dcfg.batch_size, dcfg.seq_len)
    setup = build_step(exp.model_config(), mesh, shape, attention=exp.model.attention,
                       loss_chunk=exp.train.loss_chunk_size)
    results, tot, n_all = {}, 0.0, 0.0
    with jax.set_mesh(mesh), axis_rules():
        for name in names:
            it = make_eval_iterator(prepared, dcfg, process_index=0, process_count=1, sources=[name])
            r = eval_loss(setup.eval_step, weights.params, it, batches, setup.batch_sharding, shape)
            if r["tokens"]:
                results[name] = {k: r[k] for k in ("loss", "perplexity", "tokens")}
                tot, n_all = tot + r["loss_sum"], n_all + r["tokens"]
    results["all"] = {"loss": tot / max(n_all, 1), "perplexity": math.exp(min(tot / max(n_all, 1), 50)),
                      "tokens": n_all}
    return results, weights


def format_results(results: dict) -> str:
    lines = ["| eval source | loss | perplexity | tokens |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['loss']:.4f} | {r['perplexity']:.2f} | {int(r['tokens']):,} |")
    return "\n".join(lines)
