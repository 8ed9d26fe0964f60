"""Builders and metrics of the `minicpm_niah_*` lm-eval tasks (see minicpm_jax/evals/needles.py).

lm-eval hands a task's `custom_dataset` function the run's model arguments and `--metadata` as keyword arguments.
Read here: `tokenizer` or `pretrained` (a run, HF dir or .gguf file, whose tokenizer sizes the contexts), `max_seq_lengths` (default 1024, 2048,
4096; lengths above the checkpoint's max_position_embeddings are dropped with a warning), `depths`, `niah_samples`
(per length x depth cell, default 4) and `seed`.

Tasks: minicpm_niah_{en,zh} (one needle), _multikey (3 distractor needles), _multivalue (one key, 4 numbers) and
_multiquery (4 keys, a number each); the last two score the fraction of the asked numbers named (RULER's
string_match_all), so their `acc` is a mean item score.
"""

from __future__ import annotations

import logging

from minicpm_jax.evals.needle_score import item_score
from minicpm_jax.evals.needles import TASKS, NeedleSpec, build_items

log = logging.getLogger(__name__)

LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)   # the per-length metrics the YAMLs declare
DEFAULT_LENGTHS = (1024, 2048, 4096)


def _tokenizer(kwargs):
    from data_pipeline.tokenizer import Tokenizer
    from minicpm_jax.checkpoint import run_paths
    from minicpm_jax.weights import find_tokenizer, source_kind

    if kwargs.get("tokenizer"):
        return Tokenizer.load(kwargs["tokenizer"])
    src = kwargs.get("pretrained")
    if not src:
        raise ValueError("minicpm_niah tasks size their contexts in the model's tokens: pass pretrained=<run or HF "
                         "dir> in the model arguments or tokenizer=<path> in --metadata")
    if str(src).endswith(".gguf"):        # the minicpm_gguf backend: the file's own vocabulary
        from minicpm_jax.evals.llama_tokenizer import LlamaCppTokenizer

        return LlamaCppTokenizer.from_file(src)
    tok = find_tokenizer(run_paths(src)["tokenizer"] if source_kind(src) == "run" else src)
    if tok is None:
        raise ValueError(f"minicpm_niah tasks: {src} has no tokenizer; pass tokenizer=<path> in --metadata")
    return tok


def _max_positions(src) -> int:
    """The positions a run / HF checkpoint (max_position_embeddings) or a GGUF (context_length) supports."""
    if str(src).endswith(".gguf"):
        from minicpm_jax.export.llamacpp import check_gguf

        return int(check_gguf(src).get("context_length", LENGTHS[-1]))
    from minicpm_jax.weights import source_config

    return source_config(src).max_position_embeddings


def _lengths(kwargs) -> tuple[int, ...]:
    lengths = tuple(int(n) for n in (kwargs.get("max_seq_lengths") or DEFAULT_LENGTHS))
    bad = [n for n in lengths if n not in LENGTHS]
    if bad:
        raise ValueError(f"minicpm_niah: max_seq_lengths {bad} are not among the reported lengths {LENGTHS}")
    if kwargs.get("pretrained"):
        limit = _max_positions(kwargs["pretrained"])
        if any(n > limit for n in lengths):
            log.warning("minicpm_niah: dropping lengths %s above max_position_embeddings=%d",
                        [n for n in lengths if n > limit], limit)
            lengths = tuple(n for n in lengths if n <= limit)
    if not lengths:
        raise ValueError("minicpm_niah: no context length left to build")
    return lengths


def _dataset(task: str, kwargs) -> dict:
    import datasets

    # the YAML's max_gen_toks is the spec's answer_budget (24, or 64 with several numbers asked; tested)
    spec = NeedleSpec(**TASKS[task], lengths=_lengths(kwargs), depths=tuple(kwargs.get("depths") or NeedleSpec.depths),
                      samples=int(kwargs.get("niah_samples") or 4), seed=int(kwargs.get("seed") or 0))
    items = build_items(_tokenizer(kwargs), spec)
    return {"test": datasets.Dataset.from_list(items)}


def niah_en(**kwargs):
    return _dataset("niah_en", kwargs)


def niah_zh(**kwargs):
    return _dataset("niah_zh", kwargs)


def niah_en_multikey(**kwargs):
    return _dataset("niah_en_multikey", kwargs)


def niah_zh_multikey(**kwargs):
    return _dataset("niah_zh_multikey", kwargs)


def niah_en_multivalue(**kwargs):
    return _dataset("niah_en_multivalue", kwargs)


def niah_zh_multivalue(**kwargs):
    return _dataset("niah_zh_multivalue", kwargs)


def niah_en_multiquery(**kwargs):
    return _dataset("niah_en_multiquery", kwargs)


def niah_zh_multiquery(**kwargs):
    return _dataset("niah_zh_multiquery", kwargs)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The item's score (1/0, or the fraction of the asked numbers named) as `acc` and under its length."""
    ok = item_score(doc, results[0])
    out = {str(n): -1.0 for n in LENGTHS}
    out[str(doc["length"])] = ok
    out["acc"] = ok
    return out


def aggregate(values: list[float]) -> float:
    """Mean over the items of one length (the others report -1); -1 when the run built no item of it."""
    kept = [v for v in values if v != -1]
    return sum(kept) / len(kept) if kept else -1.0
