"""`minicpm`: the one command-line entry point.

    minicpm train [--config FILE] [key=value ...] [--dry-run --fake-devices N]
    minicpm generate --checkpoint DIR | --gguf FILE | --preset tiny  --prompt TEXT
    minicpm eval --checkpoint RUN [--batches N] [key=value ...]
    minicpm export --checkpoint DIR --format gguf|hf ...
    minicpm data {build,train-tokenizer,train-classifier,score,stats,sft,prepare} ...
    minicpm sweep experiments/sweeps/NAME.yaml [--emit-commands]
    minicpm bench {sparse,data,edge,train}

`import minicpm_jax` imports JAX, but no backend starts before the arguments are parsed, so fake CPU devices for a
dry run are set through jax.config and XLA_FLAGS (the JAX_PLATFORMS variable is read at import: too late here).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "experiments" / "configs" / "tiny.yaml"


def _set_fake_devices(n: int | None):
    if n:
        import jax
        jax.config.update("jax_platforms", "cpu")
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


# --------------------------------------------------------------------------------------------- train
def _train_parser(sub):
    p = sub.add_parser("train", help="train a model from an experiment config (default: the tiny CPU run)",
                       description="Train from an experiment YAML; any field can be overridden as key=value.")
    p.add_argument("--config", default=None,
                   help=f"experiment YAML (default: {DEFAULT_CONFIG.relative_to(REPO)} when present)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=50 optim.peak_lr=3e-3")
    p.add_argument("--dry-run", action="store_true", help="compile the train step for the mesh and print memory")
    p.add_argument("--fake-devices", type=int, default=None, help="use N fake CPU devices (dry runs, tests)")
    p.add_argument("--processes", type=int, default=1, help="dry run: number of hosts the global batch spans")
    p.add_argument("--coordinator", default=None, help="multi-host: coordinator address host:port")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's id")
    p.set_defaults(func=cmd_train)


def _load_experiment(args):
    from minicpm_jax.train.config import load_config
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    overrides = list(args.overrides)
    if args.coordinator:  # a missing count or id is left unset, so the config's own check names it
        overrides += ["distributed.mode=explicit", f"distributed.coordinator_address={args.coordinator}"]
        overrides += [f"distributed.{k}={v}" for k, v in (("num_processes", args.num_processes),
                                                          ("process_id", args.process_id)) if v is not None]
    return load_config(path, overrides)


def cmd_train(args):
    _set_fake_devices(args.fake_devices)
    exp = _load_experiment(args)
    if args.dry_run:
        from minicpm_jax.train.dry_run import dry_run
        dry_run(exp, processes=args.processes)
        return 0
    from minicpm_jax.train.loop import run
    run(exp)
    return 0


# --------------------------------------------------------------------------------------------- generate
def _generate_parser(sub):
    p = sub.add_parser("generate", help="generate text from a checkpoint, a GGUF file or a random model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="HF directory (config.json + safetensors) or a training run directory")
    src.add_argument("--gguf", help="an exported GGUF file, run through llama.cpp (llama-cpp-python)")
    src.add_argument("--preset", help="a randomly initialised preset (tiny, minicpm4_0_5b, minicpm4_8b)")
    p.add_argument("--tokenizer", help="tokenizer.model / directory (default: the checkpoint's own)")
    p.add_argument("--prompt", default=None, help="prompt text")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the ChatML template (user turn)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", default="auto", choices=("auto", "dense", "sparse"))
    p.set_defaults(func=cmd_generate)


def cmd_generate(args):
    if args.prompt is None and args.prompt_ids is None:
        raise SystemExit("minicpm generate: give --prompt TEXT or --prompt-ids 1,2,3")
    prompt_ids = [int(t) for t in args.prompt_ids.split(",")] if args.prompt_ids else None
    if args.gguf:
        from minicpm_jax.export.cli import generate_with_gguf
        print(generate_with_gguf(args.gguf, args.prompt, prompt_ids, args.max_new_tokens, args.temperature,
                                 args.top_k, args.top_p, args.seed, args.chat))
        return 0
    import jax
    import minicpm_jax as mc
    tokenizer = None
    if args.checkpoint:
        from minicpm_jax.export.source import load_for_export
        cfg, params, tokenizer = load_for_export(args.checkpoint)
    else:
        cfg = mc.ModelConfig.from_preset(args.preset or "tiny")
        params = mc.init_params(cfg, jax.random.key(args.seed))
    if args.tokenizer:
        from data_pipeline.tokenizer import Tokenizer
        tokenizer = Tokenizer.load(args.tokenizer)
    if prompt_ids is None:
        if tokenizer is None:
            raise SystemExit("minicpm generate: this checkpoint has no tokenizer; pass --tokenizer or --prompt-ids")
        text = (tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
                if args.chat else args.prompt)
        prompt_ids = tokenizer.encode(text, add_bos=True)
    out = mc.generate(params, cfg, [prompt_ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, rng=jax.random.key(args.seed), attention=args.attention)
    ids = out.sequences()[0]
    print(tokenizer.decode(ids) if tokenizer is not None else ",".join(map(str, ids)))
    return 0


# --------------------------------------------------------------------------------------------- sweep
def _sweep_parser(sub):
    p = sub.add_parser("sweep", help="run (or print launch commands for) a grid of experiment overrides")
    p.add_argument("sweep", help="sweep YAML: base config, grid of keys, metrics to report")
    p.add_argument("--emit-commands", action="store_true", help="print one launch command per point, run nothing")
    p.add_argument("--launcher", default="", help="prefix for emitted commands, or a template where {} is the quoted command (sbatch --wrap {})")
    p.add_argument("overrides", nargs="*", help="overrides applied to every point")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args):
    from minicpm_jax.train.sweep import run_sweep
    run_sweep(args.sweep, emit_commands=args.emit_commands, launcher=args.launcher, extra=args.overrides)
    return 0


# --------------------------------------------------------------------------------------------- assembly
def _bench_script(name: str):
    """experiments/bench/bench_<name>.py as a module (benchmarks are scripts, not library code)."""
    import importlib.util
    path = REPO / "experiments" / "bench" / f"bench_{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minicpm", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _generate_parser(sub)
    from minicpm_jax.train.evaluate import register as register_eval
    register_eval(sub)
    from minicpm_jax.export.cli import register as register_export
    register_export(sub)
    from data_pipeline.cli import register as register_data
    register_data(sub)
    _sweep_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks that print tables of measured ratios")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from minicpm_jax.train.bench import register_bench as register_train_bench
    register_train_bench(bench_sub)
    if (REPO / "experiments" / "bench" / "bench_sparse.py").exists():  # a repo checkout (not in a built wheel)
        _bench_script("sparse").register_bench(bench_sub)
    from data_pipeline.cli import register_bench as register_data_bench
    register_data_bench(bench_sub)
    from minicpm_jax.export.cli import register_bench as register_edge_bench
    register_edge_bench(bench_sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:   # one clear line, no traceback
        if os.environ.get("MINICPM_DEBUG"):
            raise
        print(f"minicpm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
