"""`minicpm bench {sparse,train,data,edge,spec,mup,mup-transfer}`: benchmarks that print tables of ratios measured side by
side (mup: the μP coordinate check; mup-transfer: the learning-rate transfer sweep's table and plot)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from data_pipeline import bench as data_bench
from data_pipeline.prepare import load_prepared, prepare_data
from minicpm_jax.bench import edge, mup, mup_transfer, sparse, spec, train
from minicpm_jax.cli.data import add_config_arguments, data_config, setup_logging


def register(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks that print tables of measured ratios")
    bsub = bench.add_subparsers(dest="bench", required=True)

    p = bsub.add_parser("sparse", help="InfLLM v2 sparse vs dense attention, both variants (decode 32K/128K, "
                                       "prefill 32K)",
                        description=sparse.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes: 8K/32K decode, 8K prefill")
    p.add_argument("--decode-lens", type=int, nargs="*", default=None)
    p.add_argument("--prefill-len", type=int, default=None, help="0 skips the prefill comparison")
    p.add_argument("--chunk", type=int, default=64, help="queries per step of the sparse XLA path's window part")
    p.add_argument("--variants", nargs="+", choices=sparse.VARIANTS, default=None,
                   help="InfLLM v2 variants, each with its default lse_approx (default: all)")
    p.add_argument("--prefill-reps", type=int, default=1, help="timed prefill runs per side (best is kept)")
    p.set_defaults(func=lambda a: sparse.run(quick=a.quick, decode_lens=a.decode_lens, prefill_len=a.prefill_len,
                                             chunk=a.chunk, variants=a.variants, prefill_reps=a.prefill_reps) and 0)

    p = bsub.add_parser("train", help="train-step MFU against the measured matmul peak (tiny and ~100M configs)",
                        description=train.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,100m", help=f"comma list of {sorted(train.CONFIGS)}")
    p.add_argument("--dtype", default=None, help="compute dtype (default: float32 on CPU, bfloat16 elsewhere)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    p.set_defaults(func=lambda a: train.run(a.configs.split(","), a.dtype, a.batch, a.seq, a.steps) and 0)

    p = bsub.add_parser("data", help="scoring docs/s and pipeline tokens/s (0/1/2 workers) vs the train step")
    p.add_argument("--workdir", help="prepared workdir (default: a pip-only tiny preparation in the cache)")
    p.add_argument("--seconds", type=float, default=4.0, help="measuring time per pipeline setting")
    p.add_argument("--workers", default="0,1,2")
    p.add_argument("--train-tokens-per-s", type=float, help="skip measuring the train step, use this number")
    p.add_argument("--json", help="also write the numbers here")
    p.add_argument("--beam-workers", default="1,2",
                   help="DirectRunner worker processes for the Beam rows (`data process` vs the local path); '' skips")
    p.add_argument("--beam-inputs", nargs="*", help="JSONL files for the Beam rows (default: the prepared corpus)")
    add_config_arguments(p)
    p.set_defaults(func=cmd_bench_data)

    p = bsub.add_parser("edge", help="llama.cpp prefill/decode speed of GGUF exports vs JAX on CPU",
                        description=edge.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=edge.PRESETS, default="0.5b", help="model shape (random weights); default 0.5b")
    p.add_argument("--qtypes", default="f16,q8_0,q4_0", help="comma-separated GGUF qtypes (default f16,q8_0,q4_0)")
    p.add_argument("--threads", default="2", help="llama.cpp thread counts, comma-separated (default 2)")
    p.add_argument("--prompt-len", type=int, default=128, help="prefill length in tokens (default 128)")
    p.add_argument("--decode-tokens", type=int, default=64, help="decode steps measured (default 64)")
    p.add_argument("--out-dir", default=None, help="keep the GGUF files here (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench_edge)

    p = bsub.add_parser("spec", help="speculative decoding (EAGLE + FR-Spec) vs plain decode; decode bandwidth",
                        description=spec.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/tiny", help="trained run for the tiny rows (drafts cached under it)")
    p.add_argument("--data-dir", default=None, help="its prepared data (default: the run config's data_dir)")
    p.add_argument("--targets", default="tiny,0.5b", help="comma list of tiny, 0.5b")
    p.add_argument("--k", type=int, default=4, help="chain: tokens drafted per target pass (default 4)")
    p.add_argument("--tree", default="4,2,1", help="static draft tree branching ('' skips the tree rows)")
    p.add_argument("--fr-fractions", default="0.25,0.0625", help="FR-Spec sizes as fractions of the vocabulary")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt, tiny (default 32)")
    p.add_argument("--big-new-tokens", type=int, default=12, help="tokens generated per prompt, 0.5b (default 12)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per side (median; default 3)")
    p.add_argument("--train-steps", type=int, default=200, help="draft training steps (tiny; cached per FR size)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of the decode-bandwidth lines")
    p.set_defaults(func=lambda a: spec.run(
        a.run_dir, a.data_dir, [t for t in a.targets.split(",") if t], k=a.k,
        tree=tuple(int(x) for x in a.tree.split(",") if x), fractions=[float(x) for x in a.fr_fractions.split(",")],
        new_tokens=a.new_tokens, big_new_tokens=a.big_new_tokens, prompt_len=a.prompt_len, batch=a.batch,
        reps=a.reps, train_steps=a.train_steps, dtypes=[d for d in a.dtypes.split(",") if d]) and 0)

    p = bsub.add_parser("mup", help="μP coordinate check: layer-output RMS vs width at init and after Adam steps",
                        description=mup.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="128,256,512,1024,2048", help="comma-separated hidden sizes")
    p.add_argument("--layers", type=int, default=2, help="depth, the same at every width (default 2)")
    p.add_argument("--steps", default="1,4", help="Adam steps after which to record (init is always recorded)")
    p.add_argument("--lr", type=float, default=1e-2, help="constant peak_lr (the base-width lr under μP)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dim-model-base", type=float, default=256.0)
    p.add_argument("--data-dir", default="runs/data",
                   help="prepared corpus for a real-text batch (synthetic tokens when it is not prepared)")
    p.add_argument("--out", default="runs/bench/mup_coord_check.png", help="plot path (rows as JSON beside it)")
    p.set_defaults(func=lambda a: mup.run(
        [int(w) for w in a.widths.split(",")], layers=a.layers, batch=a.batch, seq=a.seq, peak_lr=a.lr,
        record_steps=[int(s) for s in a.steps.split(",")], dim_model_base=a.dim_model_base, data_dir=a.data_dir,
        out=a.out) and 0)

    p = bsub.add_parser("mup-transfer", help="table and plot of a finished μP learning-rate transfer sweep",
                        description=mup_transfer.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", nargs="?", default="runs/sweeps/mup_transfer",
                   help="the sweep's output dir (minicpm sweep experiments/sweeps/mup_transfer.yaml)")
    p.add_argument("--out", default=None, help="plot path (default: <sweep_dir>/transfer.png)")
    p.set_defaults(func=lambda a: mup_transfer.run(a.sweep_dir, a.out) and 0)


def tiny_train_tokens_per_s(batch: int, seq: int) -> float:
    """Tokens/s of the tiny model's jitted train step at this batch, after compilation (the data bench's yardstick)."""
    r = train.time_train_step(train.CONFIGS["tiny"](), batch, seq, steps=3)
    print(f"tiny train step: {r['step_s']:.3f} s per {batch}x{seq} batch (compile {r['compile_s']:.1f} s)")
    return r["tokens_per_s"]


def cmd_bench_data(args) -> int:
    setup_logging()
    cfg = data_config(args)
    if not args.overrides and not args.config:
        cfg = cfg.replace(seq_len=256, batch_size=8)  # the tiny main job's batch (minicpm_jax/configs/tiny.yaml)
    workdir = args.workdir or str(data_bench.default_workdir())
    if args.workdir and (Path(workdir) / "prepared.json").exists() and not (args.overrides or args.config):
        prepared = load_prepared(workdir)  # measure what is there; preparing anew could change it
    else:
        prepared = prepare_data(workdir, cfg, progress=False)
    res = data_bench.run(prepared, cfg, train_tokens_per_s=args.train_tokens_per_s, train_step=tiny_train_tokens_per_s,
                         workers=tuple(int(w) for w in args.workers.split(",")), seconds=args.seconds)
    numbers = data_bench.summary_numbers(res)
    if args.beam_workers:
        # Beam is imported only for these rows: every other `minicpm` command stays free of it
        from data_pipeline.beam import bench as beam_bench

        inputs = args.beam_inputs or beam_bench.default_inputs(prepared.workdir)
        mb = sum(Path(p).stat().st_size for p in inputs) / 1e6
        print(f"\n`minicpm data process` (Apache Beam, DirectRunner) vs the local path: {len(inputs)} JSONL file(s), "
              f"{mb:.1f} MB")
        with tempfile.TemporaryDirectory(prefix="minicpm-bench-beam-") as out:  # outputs are not kept
            rows = beam_bench.bench_beam(inputs, str(prepared.classifier_dir), str(prepared.tokenizer_dir), out,
                                         workers=tuple(int(w) for w in args.beam_workers.split(",")))
        beam_bench.print_rows(rows)
        numbers["beam"] = [{k: r[k] for k in ("path", "workers", "docs", "seconds", "docs_per_s", "mb_per_s")}
                           for r in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2))
    return 0


def cmd_bench_edge(args) -> int:
    qts = [q.strip() for q in args.qtypes.split(",") if q.strip()]
    threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    print(edge.run_edge_bench(args.preset, qts, threads, args.prompt_len, args.decode_tokens, args.out_dir,
                              args.seed), flush=True)
    return 0
