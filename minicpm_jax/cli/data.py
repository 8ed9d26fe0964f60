"""`minicpm data ...`: the data side of an experiment, run and inspected on its own.

Every subcommand takes `--config EXPERIMENT.yaml` (its `data:` section) and trailing `key=value` overrides of
DataConfig fields (`seq_len=1024`, `classifier.rounds=3`; a leading `data.` is accepted), so the data side of an
experiment can be run and inspected on its own.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path

from data_pipeline import corpus as C
from data_pipeline.classifier import format_rounds, train_classifier
from data_pipeline.config import DataConfig
from data_pipeline.corpus import build_corpus
from data_pipeline.prepare import format_summary, prepare_data, tokenizer_texts
from data_pipeline import copy_train
from data_pipeline.needle_train import NeedleTrainSpec, training_sentences, write_records
from data_pipeline.report import DropReport
from data_pipeline.scoring import score_files
from data_pipeline.sft import build_sft
from data_pipeline.stats import manifest_table, stats
from data_pipeline.tokenizer import Tokenizer, bytes_per_token, train_sentencepiece


def data_config(args) -> DataConfig:
    """DataConfig from `--config` (its data: section) and trailing key=value overrides (a leading `data.` is fine)."""
    overrides = [o[5:] if o.startswith("data.") else o for o in (args.overrides or [])]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key=value, got {bad}")
    if getattr(args, "config", None):
        return DataConfig.from_yaml(args.config, overrides)
    return DataConfig.from_dict({}, overrides)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="experiment YAML whose data: section to use (default: DataConfig defaults)")
    p.add_argument("overrides", nargs="*", help="DataConfig overrides, key=value (e.g. sources=[pip] seq_len=256)")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")


# ---------------------------------------------------------------- commands
def cmd_build(args) -> int:
    setup_logging()
    cfg = data_config(args)
    if args.sources:
        cfg = cfg.replace(sources=tuple(args.sources.split(",")))
    if args.no_download:
        cfg = cfg.replace(download=False)
    if args.cache_dir:
        cfg = cfg.replace(cache_dir=args.cache_dir)
    if args.inputs:
        cfg = cfg.replace(inputs=tuple(args.inputs))
    report = DropReport()
    man = build_corpus(args.out, cfg, report=report)
    print(manifest_table(man))
    print(report.format())
    print(f"corpus: {Path(args.out).resolve()} (manifest.json, jsonl/, array_record/, drops.jsonl)")
    return 0


def cmd_train_tokenizer(args) -> int:
    setup_logging()
    cfg = data_config(args)
    vocab = args.vocab_size or cfg.vocab_size
    man = C.load_manifest(args.corpus)
    texts = tokenizer_texts(Path(args.corpus), man, int(cfg.tokenizer.max_train_mb * 1e6), cfg.seed)
    tok = train_sentencepiece(texts, vocab, character_coverage=cfg.tokenizer.character_coverage,
                              add_dummy_prefix=cfg.tokenizer.add_dummy_prefix, seed=cfg.seed)
    tok.save(args.out)
    evals = [d["text"] for d in C.iter_docs(args.corpus, split="eval")][:2000]
    bpt = bytes_per_token(tok, evals) if evals else float("nan")
    print(f"{tok!r}\ntrained on {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB; {bpt:.3f} bytes/token on "
          f"held-out text; saved to {Path(args.out).resolve()}")
    return 0


def cmd_train_classifier(args) -> int:
    setup_logging()
    cfg = data_config(args)
    tok = str(Path(args.tokenizer).resolve()) if args.tokenizer else None
    if cfg.classifier.tokenization == "spm" and tok is None:
        raise ValueError("--tokenizer is needed with classifier.tokenization=spm (or set classifier.tokenization="
                         "simple)")
    report = train_classifier(args.corpus, args.out, cfg, tokenizer_path=tok)
    print(format_rounds(report))
    print(f"classifier: {Path(args.out).resolve()} (classifier.json, rounds.json)")
    return 0


def cmd_score(args) -> int:
    setup_logging()
    report = DropReport()
    res = score_files(args.inputs, args.classifier, args.out, threshold=args.threshold, report=report)
    print(f"scored {res['docs']} docs ({res['docs_per_s']} docs/s): kept {res['kept']} "
          f"({res['kept_share']}) at threshold {res['threshold']} -> {res['output']}")
    print(report.format())
    return 0


def cmd_stats(args) -> int:
    print(stats(args.path, png=args.png, threshold=args.threshold))
    return 0


def cmd_sft(args) -> int:
    setup_logging()
    cfg = data_config(args)
    tok = Tokenizer.load(args.tokenizer)
    summary = build_sft(args.out, cfg, tok)
    for name, s in summary["sources"].items():
        print(f"{name:16s} {s['conversations']:6d} conversations, {s['tokens']:8d} tokens, "
              f"{100 * s['target_tokens'] / max(s['tokens'], 1):.0f}% assistant (loss) tokens")
    for name, why in summary["unavailable"].items():
        print(f"{name:16s} unavailable: {why}")
    print(f"SFT data: {Path(args.out).resolve()} (conversations.jsonl, tokens/)")
    return 0


def cmd_process(args) -> int:
    setup_logging()
    logging.getLogger("apache_beam").setLevel(logging.WARNING)  # its INFO lines drown the per-file progress
    # Beam is imported only by this command: `import data_pipeline` and the other commands stay light
    from data_pipeline.beam.config import DedupConfig, ProcessConfig
    from data_pipeline.beam.run import format_report, run_process

    dedup = DedupConfig(exact=not args.no_exact_dedup, near=not args.no_near_dedup, jaccard=args.jaccard,
                        num_perm=args.num_perm, bands=args.bands, shingle=args.shingle)
    cfg = ProcessConfig(inputs=tuple(args.inputs), out=args.out, classifier=args.classifier, tokenizer=args.tokenizer,
                        threshold=args.threshold, max_doc_mb=args.max_doc_mb, max_doc_chars=args.max_doc_chars,
                        target_shard_mb=args.target_shard_mb, dedup=dedup)
    beam_args = shlex.split(args.beam_options or "")
    if args.runner:
        beam_args.append(f"--runner={args.runner}")
    if args.direct_num_workers:
        beam_args.append(f"--direct_num_workers={args.direct_num_workers}")
    if args.direct_running_mode:
        beam_args.append(f"--direct_running_mode={args.direct_running_mode}")
    report = run_process(cfg, beam_args, overwrite=args.overwrite)
    print(format_report(report, args.out))
    if report.get("counters"):
        print("beam counters: " + ", ".join(f"{k}={v}" for k, v in sorted(report["counters"].items())))
    return 0


def cmd_needles(args) -> int:
    spec = NeedleTrainSpec(items=args.items, min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                           max_needles=args.max_needles, seed=args.seed)
    s = write_records(args.out, Tokenizer.load(args.tokenizer), spec)
    print(f"needle training records: {s['items']} items, {s['questions']} questions, {s['tokens']:,} tokens "
          f"({s['answer_tokens']:,} answer tokens in the loss) -> {Path(args.out).resolve() / 'tokens/train'}")
    return 0


def cmd_copies(args) -> int:
    spec = copy_train.CopyTrainSpec(items=args.items, min_span=args.min_span, max_span=args.max_span, seed=args.seed,
                                    min_gap=args.min_gap, max_gap=args.max_gap, filler=args.filler,
                                    min_lead=args.min_lead, max_lead=args.max_lead, paragraph=args.paragraph,
                                    span_chars=args.span_chars)
    tok = Tokenizer.load(args.tokenizer)
    pool, text_ids = copy_train.item_inputs(tok, training_sentences(), spec, args.pool_size)
    s = copy_train.write_records(args.out, tok, spec, pool, text_ids)
    print(f"copy-task records: {s['items']} items, {s['tokens']:,} tokens ({s['loss_tokens']:,} in the loss), ids "
          f"from {s['pool']:,} -> {Path(args.out).resolve() / 'tokens/train'}")
    return 0


def cmd_prepare(args) -> int:
    setup_logging()
    p = prepare_data(args.workdir, data_config(args))
    print(format_summary(p))
    return 0


# ---------------------------------------------------------------- registration
def register(subparsers) -> argparse.ArgumentParser:
    """Add `data` with its subcommands to an argparse subparsers object; each sets `func(args)`."""
    data = subparsers.add_parser("data", help="corpus, tokenizer, UltraClean classifier, scoring, SFT data")
    sub = data.add_subparsers(dest="data_command", required=True)

    p = sub.add_parser("build", help="assemble the bilingual corpus (JSONL + ArrayRecord + manifest)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--sources", help="comma list of tiers (auto, pip, system, debian) and/or source names")
    p.add_argument("--no-download", action="store_true", help="use only Debian packages already in the cache")
    p.add_argument("--cache-dir", help="Debian package cache (default ~/.cache/minicpm-jax or $MINICPM_CACHE)")
    p.add_argument("--inputs", nargs="+", help="extra JSONL document files to include")
    add_config_arguments(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("train-tokenizer", help="train the SentencePiece BPE tokenizer on a built corpus")
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, help="default: data.vocab_size")
    add_config_arguments(p)
    p.set_defaults(func=cmd_train_tokenizer)

    p = sub.add_parser("train-classifier", help="train the iterative UltraClean fastText classifier")
    p.add_argument("--corpus", required=True)
    p.add_argument("--tokenizer", help="tokenizer dir (for classifier.tokenization=spm)")
    p.add_argument("--out", required=True)
    add_config_arguments(p)
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser("score", help="score JSONL documents (or a corpus dir) with a trained classifier")
    p.add_argument("inputs", nargs="+", help="JSONL files or corpus directories")
    p.add_argument("--classifier", required=True, help="classifier directory (from train-classifier)")
    p.add_argument("--out", required=True, help="output JSONL (input fields + score + keep)")
    p.add_argument("--threshold", type=float, help="default: the classifier's")
    p.set_defaults(func=cmd_score, overrides=[])

    p = sub.add_parser("stats", help="print the manifest and score distribution; write a histogram PNG")
    p.add_argument("path", help="corpus dir, prepared workdir, or scored JSONL")
    p.add_argument("--png", help="histogram path (default beside the input)")
    p.add_argument("--threshold", type=float)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("sft", help="build ChatML SFT conversations from real Q&A, tokenized with assistant masks")
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    add_config_arguments(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("process", help="Apache Beam: read -> dedup (exact + MinHash LSH) -> UltraClean score -> "
                                       "tokenize -> token shards, on the DirectRunner or a cluster runner")
    p.add_argument("inputs", nargs="+", help="JSONL / Parquet / text files or globs (any Beam filesystem: gs://, ...)")
    p.add_argument("--out", required=True, help="output directory: train/, eval/ shards, manifest.json, report.json")
    p.add_argument("--classifier", required=True, help="trained classifier directory (from train-classifier)")
    p.add_argument("--tokenizer", required=True, help="the run's tokenizer directory (or tokenizer.model)")
    p.add_argument("--threshold", type=float, help="keep score >= threshold (default: the classifier's)")
    p.add_argument("--jaccard", type=float, default=0.8, help="near-duplicate Jaccard threshold (default 0.8)")
    p.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default 128)")
    p.add_argument("--bands", type=int, help="LSH bands (default: datasketch's optimum for --jaccard)")
    p.add_argument("--shingle", type=int, default=5, help="words per shingle (default 5)")
    p.add_argument("--no-exact-dedup", action="store_true")
    p.add_argument("--no-near-dedup", action="store_true")
    p.add_argument("--max-doc-mb", type=float, default=8.0, help="larger documents / lines are dropped as huge")
    p.add_argument("--max-doc-chars", type=int, default=4000, help="longer documents are split into pieces")
    p.add_argument("--target-shard-mb", type=float, default=256.0)
    p.add_argument("--overwrite", action="store_true", help="empty --out first")
    p.add_argument("--runner", help="Beam runner (default DirectRunner): DataflowRunner, FlinkRunner, SparkRunner...")
    p.add_argument("--direct-num-workers", type=int, help="DirectRunner workers")
    p.add_argument("--direct-running-mode", choices=("in_memory", "multi_threading", "multi_processing"))
    p.add_argument("--beam-options", help="more pipeline options for the runner, one string: "
                                          "--beam-options='--project=P --region=R --temp_location=gs://B/tmp'")
    p.set_defaults(func=cmd_process, overrides=[])

    p = sub.add_parser("needles", help="needle-retrieval training records over the corpus's training text "
                                       "(loss on the answers)")
    p.add_argument("--tokenizer", required=True, help="the model's tokenizer dir")
    p.add_argument("--out", required=True, help="output dir (tokens/train/needle_train_en-*.array_record)")
    p.add_argument("--items", type=int, default=NeedleTrainSpec.items)
    p.add_argument("--min-tokens", type=int, default=NeedleTrainSpec.min_tokens)
    p.add_argument("--max-tokens", type=int, default=NeedleTrainSpec.max_tokens, help="at most the training seq_len")
    p.add_argument("--max-needles", type=int, default=NeedleTrainSpec.max_needles, help="needles = questions per item")
    p.add_argument("--seed", type=int, default=NeedleTrainSpec.seed, help="item namespace (the eval uses its own)")
    p.set_defaults(func=cmd_needles)

    p = sub.add_parser("copies", help="copy-task warm-up records (a random span twice, loss on the second copy): "
                                      "forms induction heads before needle training")
    p.add_argument("--tokenizer", required=True, help="the model's tokenizer dir (ids come from its training text)")
    p.add_argument("--out", required=True, help="output dir (tokens/train/copy_train-*.array_record)")
    p.add_argument("--items", type=int, default=copy_train.CopyTrainSpec.items)
    p.add_argument("--min-span", type=int, default=copy_train.CopyTrainSpec.min_span)
    p.add_argument("--max-span", type=int, default=copy_train.CopyTrainSpec.max_span)
    p.add_argument("--pool-size", type=int, default=None,
                   help="draw ids from the N most frequent of the training text (default: every id it uses)")
    p.add_argument("--span-chars", default=None,
                   help="draw ids from these characters instead (each one token), e.g. 0123456789: spans that "
                        "repeat symbols, like a needle's number")
    p.add_argument("--seed", type=int, default=copy_train.CopyTrainSpec.seed)
    p.add_argument("--min-gap", type=int, default=copy_train.CopyTrainSpec.min_gap,
                   help="filler tokens between the copies, at least (the copy distance is then not the span length)")
    p.add_argument("--max-gap", type=int, default=copy_train.CopyTrainSpec.max_gap)
    p.add_argument("--min-lead", type=int, default=copy_train.CopyTrainSpec.min_lead,
                   help="filler tokens before the first copy, at least (so it does not always follow the BOS)")
    p.add_argument("--max-lead", type=int, default=copy_train.CopyTrainSpec.max_lead)
    p.add_argument("--paragraph", type=int, default=copy_train.CopyTrainSpec.paragraph,
                   help="with --filler text: start a new line every N sentences (0: one running line)")
    p.add_argument("--filler", choices=copy_train.FILLERS, default=copy_train.CopyTrainSpec.filler,
                   help="the gap: random pool ids, or running training text (prose around the copies, as a needle's)")
    p.set_defaults(func=cmd_copies)

    p = sub.add_parser("prepare", help="everything the main job needs, cached (what `minicpm train` runs)")
    p.add_argument("--workdir", required=True)
    add_config_arguments(p)
    p.set_defaults(func=cmd_prepare)
    return data
