"""`minicpm export`: a training run or HF checkpoint to GGUF (llama.cpp) or HF safetensors.

    minicpm export --checkpoint DIR --format gguf --qtype q8_0 --out model-q8_0.gguf [--tokenizer PATH]
    minicpm export --checkpoint DIR --format hf --out hf_dir [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_pipeline.tokenizer import Tokenizer
from minicpm_jax.export.files import check_output_path
from minicpm_jax.export.gguf import to_gguf
from minicpm_jax.export.hf_export import export_hf
from minicpm_jax.export.qtypes import ALL_QTYPES
from minicpm_jax.weights import load_weights

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
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a training run (default: latest)")
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


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)     # gguf-py logs every planned shard at INFO


def run_export(args) -> int:
    """`minicpm export`: load, export, print where the output is."""
    _setup_logging()
    if args.format == "hf" and args.qtype is not None:
        raise ValueError("--qtype applies to --format gguf; for HF safetensors use --dtype")
    if args.format == "gguf" and args.dtype is not None:
        raise ValueError("--dtype applies to --format hf; for GGUF use --qtype")
    check_output_path(args.out, directory=args.format == "hf")     # before the (long) load and export
    ckpt = Path(args.checkpoint)
    w = load_weights(ckpt, step=args.step)
    print(f"weights: {w.describe()}", file=sys.stderr)
    cfg, params, tokenizer = w.cfg, w.params, w.tokenizer
    if args.tokenizer:
        tokenizer = Tokenizer.load(args.tokenizer)
    if tokenizer is None:
        log.warning("no tokenizer found in %s and none given with --tokenizer", ckpt)
    if args.format == "hf":
        out = export_hf(args.out, cfg, params, tokenizer, dtype=args.dtype, remote_code_dir=ckpt)
        print(f"exported HF checkpoint: {out}")
        return 0
    rep = to_gguf(args.out, cfg, params, tokenizer, args.qtype or "f16", name=args.name or ckpt.resolve().name,
                  allow_tokenizer_mismatch=args.allow_tokenizer_mismatch, n_threads=args.threads)
    print(f"exported GGUF: {rep.summary()}")
    return 0
