"""`minicpm train`: the main job (data -> training -> samples -> exports -> summary), or a dry run of a pod config.

This module is the run driver: the training loop returns the final weights, and the end-of-run samples and exports
(HF safetensors, GGUF) are called from here, so training and export stay independent of each other.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from minicpm_jax.cli.common import load_experiment, set_fake_devices
from minicpm_jax.export.gguf import to_gguf
from minicpm_jax.export.hf_export import export_hf
from minicpm_jax.convert.hf import to_host
from minicpm_jax.speculative.draft import Draft
from minicpm_jax.speculative.hf import save_draft_hf
from minicpm_jax.train.config import ExperimentConfig
from minicpm_jax.train.dry_run import dry_run
from minicpm_jax.train.loop import TrainResult, init_distributed, run
from minicpm_jax.train.metrics import plot_losses, read_metrics
from minicpm_jax.train.phase import resolve_source_model
from minicpm_jax.train.run_dir import RunLock
from minicpm_jax.train.samples import check_draft, sample_text


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model from an experiment config (default: the tiny CPU run)",
                       description="Train from an experiment YAML (a path, or the name of a shipped config such as "
                                   "tiny or minicpm4_8b); any field can be overridden as key=value.")
    p.add_argument("--config", default=None, help="experiment YAML or shipped config name (default: tiny)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=50 optim.peak_lr=3e-3")
    p.add_argument("--dry-run", action="store_true", help="compile the train step for the mesh and print memory")
    p.add_argument("--fake-devices", type=int, default=None, help="use N fake CPU devices (dry runs, tests)")
    p.add_argument("--processes", type=int, default=1, help="dry run: number of hosts the global batch spans")
    p.add_argument("--dry-run-json", default=None, metavar="PATH",
                   help="dry run: also write the report as JSON (exit status 1 when the step does not fit)")
    p.add_argument("--coordinator", default=None, help="multi-host: coordinator address host:port")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's id")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    set_fake_devices(args.fake_devices)
    exp = load_experiment(args.config, args.overrides, coordinator=args.coordinator,
                          num_processes=args.num_processes, process_id=args.process_id)
    if args.dry_run:
        if exp.train.init_from is not None and Path(exp.train.init_from).exists():   # the model the run would train
            exp, notes = resolve_source_model(exp)
            for note in notes:
                print(note)
        report = dry_run(exp, processes=args.processes)
        if args.dry_run_json:
            Path(args.dry_run_json).write_text(json.dumps(report, indent=1) + "\n")
        return 1 if report["fits"] is False else 0
    if not sys.stderr.isatty():   # data preparation reports its steps as plain log lines instead of bars
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    main_job(exp)
    return 0


def main_job(exp: ExperimentConfig) -> dict:
    """Train, then (process 0) write the loss plot, sample text, export and write summary.json; returns it.

    The run directory stays locked (one writer) from before training until the last export is written."""
    init_distributed(exp.distributed)
    main = jax.process_index() == 0
    with RunLock(exp.output_dir, enabled=main):
        return _main_job(exp, main)


def _main_job(exp: ExperimentConfig, main: bool) -> dict:
    result = run(exp, locked=True)
    outputs = {"run_dir": str(result.run_dir), "checkpoints": str(result.run_dir / "checkpoints"),
               "metrics": str(result.run_dir / "logs" / "metrics.jsonl"),
               "tensorboard": str(result.run_dir / "logs" / "tensorboard")}
    if main:
        outputs["loss_plot"] = str(plot_losses(result.run_dir))
    samples, t = [], exp.train
    if jax.process_count() == 1 and result.draft is None:
        samples = sample_text(result.params, result.cfg, result.tokenizer, t.sample_prompts, t.sample_tokens,
                              chat=t.sample_chat, temperature=t.sample_temperature, top_p=t.sample_top_p,
                              seed=exp.seed)
    speculative = {}
    if jax.process_count() == 1 and result.draft is not None:
        d = result.draft
        speculative = check_draft(d.target_params, result.cfg, draft_of(result), result.tokenizer, t.sample_prompts,
                                  exp.draft.check_tokens, exp.draft.check_draft_tokens, attention=exp.model.attention)
        samples = speculative.pop("text", [])
    outputs.update(export_run(result))
    rows = read_metrics(result.run_dir) if main else []      # the whole run, resumed segments included
    train_losses = [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]
    eval_losses = [(r["step"], r["loss"]) for r in rows if r["split"] == "eval"]
    summary = {"steps": result.steps, "train_losses": train_losses, "eval_losses": eval_losses,
               "outputs": outputs, "samples": samples}
    if speculative:
        summary["speculative"] = speculative
    if main:
        (result.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        print_summary(summary)
    return summary


def export_run(result: TrainResult) -> dict[str, str]:
    """The run's final weights as an HF directory and GGUF files, as its `export` section asks."""
    exp, cfg, params, tok, run_dir = result.exp, result.cfg, result.params, result.tokenizer, result.run_dir
    out = {}
    if result.draft is not None:                      # a draft head: its HF directory (CPM.cu layout), nothing else
        if jax.process_index() == 0:
            out["draft_hf"] = str(save_draft_hf(run_dir / "export" / "draft", draft_of(result), cfg))
        return out
    if exp.export.hf:
        out["hf"] = str(export_hf(run_dir / "export" / "hf", cfg, params, tok))
    if exp.export.gguf_qtypes:
        host = jax.tree.map(to_host, params)            # every process takes part in the gather
        for q in exp.export.gguf_qtypes:
            if jax.process_index() == 0:
                out[f"gguf_{q}"] = str(to_gguf(run_dir / "export" / f"{exp.name}-{q}.gguf", cfg, host, tok,
                                               qtype=q).path)
    return out


def draft_of(result: TrainResult) -> Draft:
    """A draft run's trained head, ready to decode with."""
    host = jax.tree.map(to_host, result.params)
    return Draft(host, jnp.asarray(result.draft.fr_ids), result.draft.draft_cfg)


def print_summary(s: dict) -> None:
    tl, el = s["train_losses"], s["eval_losses"]
    first = tl[0][1] if tl else float("nan")
    last = tl[-1][1] if tl else float("nan")
    lines = [f"\n=== run finished: {s['steps']} steps, train loss {first:.3f} -> {last:.3f}"]
    if el:
        lines.append(f"    eval loss {el[0][1]:.3f} (step {el[0][0]}) -> {el[-1][1]:.3f} (step {el[-1][0]})")
    for k, v in s["outputs"].items():
        lines.append(f"    {k:<12} {v}")
    for t in s["samples"]:
        lines.append(f"    sample: {t!r}")
    if s.get("speculative"):
        sp = s["speculative"]
        lines.append(f"    speculative decoding (k={sp['draft_tokens']}): {sp['tokens_per_pass']:.2f} tokens per target "
                     f"pass, greedy output {'identical to' if sp['exact'] else 'DIFFERENT from'} plain decoding")
    print("\n".join(lines), flush=True)
