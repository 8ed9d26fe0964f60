"""Command-line pieces of the export step, plugged into the `minicpm` entry point by minicpm_jax/cli.py.

    register(subparsers)            adds `minicpm export`
    register_bench(bench_subparsers) adds `minicpm bench edge`
    generate_with_gguf(...)         what `minicpm generate --gguf FILE` calls

    minicpm export --checkpoint DIR --format gguf --qtype q8_0 --out model-q8_0.gguf [--tokenizer PATH]
    minicpm export --checkpoint DIR --format hf --out hf_dir [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

from minicpm_jax.export.qtypes import ALL_QTYPES

log = logging.getLogger("minicpm_jax.export")

_EPILOG = """qtypes: f32, f16, bf16, q8_0, q4_0 (gguf-py), tq1_0 / tq2_0 (ternary; lossless for a model trained with
weight_quant=ternary), q4_k_m (llama.cpp's own quantizer). token_embd/output stay at F16/Q8_0; matrices whose rows do
not fit a type's block fall back per tensor (logged). HF export writes MiniCPM's format (MiniCPMForCausalLM): vLLM and
SGLang load it natively; for transformers copy OpenBMB's configuration_minicpm.py and modeling_minicpm.py next to it."""


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `export` command to an argparse subparsers object; its `func` takes the parsed args."""
    p = subparsers.add_parser("export", help="export a checkpoint to GGUF (llama.cpp) or HF safetensors",
                              description="Export an HF checkpoint directory or an orbax training run to GGUF or "
                                          "HF safetensors.", epilog=_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="HF checkpoint directory or orbax training run directory")
    p.add_argument("--format", choices=("gguf", "hf"), default="gguf", help="output format (default gguf)")
    p.add_argument("--qtype", choices=ALL_QTYPES, default=None, help="GGUF tensor type (default f16)")
    p.add_argument("--out", required=True, help="output .gguf file, or directory for --format hf")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.model / tokenizer.json / directory, when the checkpoint has none (or to replace it)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="HF safetensors dtype (default: the checkpoint's parameter dtype)")
    p.add_argument("--name", default=None, help="GGUF general.name (default: the checkpoint directory name)")
    p.add_argument("--threads", type=int, default=None, help="threads for llama.cpp's quantizer (q4_k_m)")
    p.add_argument("--allow-tokenizer-mismatch", action="store_true",
                   help="write a tokenizer llama.cpp cannot reproduce exactly (e.g. NFKC normalizer) with a warning")
    p.set_defaults(func=run_export)
    return p


def register_bench(bench_subparsers) -> argparse.ArgumentParser:
    """Add `edge` to the `minicpm bench` subcommands."""
    from minicpm_jax.export import bench

    p = bench_subparsers.add_parser("edge", help="llama.cpp prefill/decode speed of GGUF exports vs JAX on CPU",
                                    description=bench.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(p)
    return p


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)     # gguf-py logs every planned shard at INFO


def run_export(args) -> int:
    """`minicpm export`: load, export, print where the output is."""
    _setup_logging()
    from minicpm_jax.export.source import load_for_export, load_tokenizer

    if args.format == "hf" and args.qtype is not None:
        raise SystemExit("--qtype applies to --format gguf; for HF safetensors use --dtype")
    if args.format == "gguf" and args.dtype is not None:
        raise SystemExit("--dtype applies to --format hf; for GGUF use --qtype")
    ckpt = Path(args.checkpoint)
    cfg, params, tokenizer = load_for_export(ckpt)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        log.warning("no tokenizer found in %s and none given with --tokenizer", ckpt)
    if args.format == "hf":
        from minicpm_jax.export.hf_export import export_hf

        out = export_hf(args.out, cfg, params, tokenizer, dtype=args.dtype, remote_code_dir=ckpt)
        print(f"exported HF checkpoint: {out}")
        return 0
    from minicpm_jax.export.gguf import to_gguf

    rep = to_gguf(args.out, cfg, params, tokenizer, args.qtype or "f16", name=args.name or ckpt.resolve().name,
                  allow_tokenizer_mismatch=args.allow_tokenizer_mismatch, n_threads=args.threads)
    print(f"exported GGUF: {rep.summary()}")
    return 0


def generate_with_gguf(gguf_path: str, prompt: Optional[str], prompt_ids: Optional[Sequence[int]],
                       max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int,
                       chat: bool) -> str:
    """Generate with llama.cpp from an exported GGUF, using the file's own tokenizer and chat template.

    Exactly one of `prompt` (text; a BOS is added, and with chat=True the file's ChatML template wraps it as one
    user turn with the assistant prompt) or `prompt_ids` (token ids, used as given) must be set. temperature 0 is
    greedy; top_k 0 and top_p 1 disable those filters. Returns the generated text (without the prompt).
    """
    _setup_logging()
    from minicpm_jax.export.llamacpp import generate_text

    return generate_text(gguf_path, prompt=prompt, prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, chat=chat)
