"""Run a list of evaluation tasks on one loaded model and collect one report (what `minicpm eval --tasks` prints).

Task names:
  niah_en, niah_zh                    needle in a haystack of held-out text (`needles.py`), scored per length x depth
  niah_en_multikey, niah_zh_multikey  the same with 3 distractor needles
  niah_{en,zh}_multivalue            one key with 4 numbers, all asked for (RULER's multi-value)
  niah_{en,zh}_multiquery            4 keys with a number each, all asked for (RULER's multi-query)
  humaneval                           HumanEval pass@1 (`humaneval.py`)
  anything else                       an lm-eval task: ours (`tasks/`: minicpm_cloze_en, minicpm_niah_*) or any of
                                      lm-eval's own that needs no download (their index is loaded only then), e.g.
                                      RULER's offline six: niah_single_1, niah_multikey_2, niah_multikey_3,
                                      ruler_vt, ruler_cwe, ruler_fwe (the rest read downloaded essays). A RULER
                                      length lm-eval may not build with the run's tokenizer is skipped with the
                                      reason (`ruler_sizing.py`: there its generators can hang or build items with
                                      no answer), as is one past the model's positions.

The needle tasks run here rather than through lm-eval so the report keeps the per-depth grid and the items can be
written as JSONL beside the predictions; they use the same generation (`MiniCPMLM.generate_until`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from minicpm_jax.evals import needle_score, needles, ruler_sizing
from minicpm_jax.evals.needles import NeedleSpec

DEFAULT_LENGTHS = (1024, 2048, 4096)


@dataclasses.dataclass
class SuiteSettings:
    """lengths / depths / samples: the needle grid (lengths above the model's window are dropped); limit: items per
    lm-eval task and HumanEval problems (None = all); out_dir: where item and prediction JSONL go (None = nowhere):
    the needle items and predictions, lm-eval's per-item samples (`<task>.samples.jsonl`, RULER's per length
    `<task>@<length>.samples.jsonl`) and HumanEval's completions; ruler_tokenizer: the transformers tokenizer
    directory lm-eval's RULER tasks size their items with (default: the model's own; a GGUF has none, so models
    compared side by side are given the JAX model's, and are asked the same items)."""

    lengths: Sequence[int] = DEFAULT_LENGTHS
    depths: Sequence[float] = NeedleSpec.depths
    samples: int = 4
    limit: Optional[int] = None
    seed: int = 0
    out_dir: Optional[Path] = None
    ruler_tokenizer: Optional[str] = None


def _needles(lm, name: str, s: SuiteSettings, log: Callable[[str], None]) -> dict:
    lengths = tuple(n for n in s.lengths if n <= lm.max_length)
    if len(lengths) < len(s.lengths):
        log(f"{name}: lengths {[n for n in s.lengths if n > lm.max_length]} exceed the model's {lm.max_length} "
            "positions; skipped")
    if not lengths:
        raise ValueError(f"{name}: no length fits the model's {lm.max_length} positions (asked {list(s.lengths)})")
    spec = NeedleSpec(**needles.TASKS[name], lengths=lengths, depths=tuple(s.depths), samples=s.samples, seed=s.seed)
    items = needles.build_items(lm.tokenizer, spec)
    from lm_eval.api.instance import Instance

    kw = {"until": ["\n"], "max_gen_toks": spec.answer_budget, "do_sample": False}
    preds = lm.generate_until([Instance("generate_until", it, (it["prompt"], dict(kw)), i)
                               for i, it in enumerate(items)])
    res = needle_score.score(items, preds)
    if s.out_dir is not None:
        needles.write_jsonl(items, Path(s.out_dir) / f"{name}.items.jsonl")
        needles.write_jsonl([{"id": it["id"], "prediction": p, "correct": c, "score": sc}
                             for it, p, c, sc in zip(items, preds, res["correct"], res["scores"])],
                            Path(s.out_dir) / f"{name}.predictions.jsonl")
    res.pop("correct")
    res.pop("scores")
    # floors. Naming no number scores 0. Naming every number of the prompt scores 0 with distractors (multikey) but
    # 1.0 on the others: on niah_en/zh the needle's is the only number, and on multivalue / multiquery every needle
    # is asked about, so listing them all is the full answer (as in RULER, whose string_match_all has no penalty).
    # Copying the first 7-digit number of the prompt scores this: 1.0 with a single needle (retrieval there is
    # finding the one number), with distractors the chance the asked needle comes first (the key must pick it), and
    # on multivalue / multiquery 1/4 (one of the four, whichever comes first; less if the haystack has a number)
    first = [(re.findall(r"\d{7}", it["prompt"]) or [""])[0] for it in items]
    res["floor_first_number"] = needle_score.score(items, first)["accuracy"]
    # models compared side by side must have been asked the same items (each builds them with its own tokenizer)
    res["items_sha256"] = hashlib.sha256(json.dumps([(it["id"], it["prompt"], it["answer"]) for it in items],
                                                    ensure_ascii=False).encode()).hexdigest()
    return {"kind": "needle", "metric": "accuracy", "value": res["accuracy"], **res}


def _humaneval(lm, s: SuiteSettings, log) -> dict:
    from minicpm_jax.evals import humaneval

    work = None if s.out_dir is None else Path(s.out_dir) / "humaneval"
    r = humaneval.run(lm, s.limit, progress=log, workdir=work)
    return {"kind": "humaneval", "metric": "pass@1", "value": r["pass@1"], "n": r["n"],
            "passed": [row["task_id"] for row in r["results"] if row["passed"]]}


RULER_TASKS = {"niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multiquery", "niah_multivalue", "ruler_vt", "ruler_cwe", "ruler_fwe",
               "ruler_qa_squad", "ruler_qa_hotpot"}   # lm-eval's RULER: one metric per length, declared from 4096 up


def tokenizer_dir(lm) -> Optional[str]:
    """The directory of `lm`'s tokenizer files, which transformers' AutoTokenizer loads (None for a GGUF)."""
    if lm.tokenizer.path is not None and getattr(lm.tokenizer, "kind", None) != "gguf":
        return str(Path(lm.tokenizer.path).parent)
    return None


def _ruler_tokenizer(lm, name: str, s: SuiteSettings) -> str:
    """What lm-eval's RULER task `name` sizes its items with (`SuiteSettings.ruler_tokenizer`)."""
    found = s.ruler_tokenizer or tokenizer_dir(lm)
    if found is None:
        raise ValueError(f"{name}: lm-eval's RULER tasks size their items with a transformers tokenizer directory, "
                         f"and {lm.source} has none beside it; score it with its checkpoint (`minicpm eval "
                         "--checkpoint RUN_OR_HF_DIR --gguf FILE`: the checkpoint's tokenizer then sizes both)")
    return found


@dataclasses.dataclass(frozen=True)
class _RulerPlan:
    """A RULER task's run, decided before any task runs: the tokenizer that sizes its items, the lengths to run,
    and the lengths skipped with the reason."""

    tokenizer: str
    lengths: tuple[int, ...]
    skipped: dict


def _ruler_plan(lm, name: str, s: SuiteSettings) -> _RulerPlan:
    tok = _ruler_tokenizer(lm, name, s)
    skipped = {n: f"exceeds the model's {lm.max_length} positions" for n in s.lengths if n > lm.max_length}
    # lm-eval's own generators hang or build unanswerable items where their first size step does not fit
    skipped.update({n: why for n in s.lengths if n not in skipped and (why := ruler_sizing.problem(name, tok, n))})
    lengths = tuple(n for n in s.lengths if n not in skipped)
    if not lengths:
        raise ValueError(f"{name}: none of the lengths {list(s.lengths)} can be run: "
                         + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
    return _RulerPlan(tok, lengths, dict(sorted(skipped.items())))


def _lm_eval_once(lm, name: str, s: SuiteSettings, lengths: Sequence[int], tokenizer: Optional[str] = None,
                  samples_file: Optional[str] = None) -> dict:
    """One `lm_eval.simple_evaluate` of task `name` (a RULER task's items sized with `tokenizer`); with `s.out_dir`
    its per-item documents, predictions and metrics go to `out_dir / samples_file` (default
    `<name>.samples.jsonl`) as JSONL."""
    import lm_eval

    from minicpm_jax.evals import TASKS_DIR, task_manager

    ours = (TASKS_DIR / f"{name}.yaml").is_file()
    meta = {"pretrained": lm.source, "max_seq_lengths": list(lengths), "depths": list(s.depths),
            "niah_samples": s.samples, "seed": s.seed}
    own = tokenizer_dir(lm)         # ours size with the model's own (a GGUF's is its file's vocabulary)
    if tokenizer or own:
        meta["tokenizer"] = tokenizer or own
    if s.limit:
        meta["cloze_samples"] = s.limit
    if name in RULER_TASKS:
        ruler_sizing.reseed_generators()
    r = lm_eval.simple_evaluate(model=lm, tasks=[name], limit=s.limit, bootstrap_iters=0, log_samples=True,
                                task_manager=task_manager(meta, include_defaults=not ours))
    if r is None or name not in r["results"]:
        raise ValueError(f"lm-eval returned no results for task {name!r}")
    docs = [x["doc_hash"] for x in sorted(r["samples"][name], key=lambda x: x["doc_id"])]
    if s.out_dir is not None:
        # arguments and responses: one per request ((context, generation kwargs) -> text, or (context,
        # continuation) -> (loglikelihood, is_greedy) per choice); a document once per filter
        needles.write_jsonl(({"doc_id": x["doc_id"], "filter": x["filter"], "doc": x["doc"], "target": x["target"],
                              "arguments": x["arguments"], "responses": x["filtered_resps"],
                              **{m: x[m] for m in x.get("metrics", ()) if m in x}}
                             for x in r["samples"][name]),
                            Path(s.out_dir) / (samples_file or f"{name}.samples.jsonl"))
    metrics = {k.split(",")[0]: v for k, v in r["results"][name].items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return {"metrics": metrics, "n": r.get("n-samples", {}).get(name, {}).get("effective"),
            "items_sha256": hashlib.sha256(json.dumps(docs).encode()).hexdigest()}


def _ruler(lm, name: str, s: SuiteSettings, plan: _RulerPlan, log) -> dict:
    """One lm-eval run per length: RULER aggregates undeclared (short) lengths over all items."""
    for n, why in plan.skipped.items():
        log(f"eval: {name} @ {n}: skipped: {why}")
    by_length, n, metrics, shas = {}, 0, {}, []
    for length in plan.lengths:
        one = _lm_eval_once(lm, name, s, [length], plan.tokenizer, samples_file=f"{name}@{length}.samples.jsonl")
        shas.append(one["items_sha256"])
        by_length[length] = one["metrics"][str(length)]
        n += one["n"] or 0
        metrics[str(length)] = by_length[length]
        log(f"eval: {name} @ {length}: {by_length[length]:.4f}")
    return {"kind": "lm_eval", "metric": "mean over lengths", "value": sum(by_length.values()) / len(by_length),
            "n": n, "metrics": metrics, "by_length": by_length, "skipped": plan.skipped,
            "items_sha256": hashlib.sha256("".join(shas).encode()).hexdigest()}


def _lm_eval(lm, name: str, s: SuiteSettings) -> dict:
    one = _lm_eval_once(lm, name, s, [n for n in s.lengths if n <= lm.max_length])
    metrics = one["metrics"]
    main = "acc" if "acc" in metrics else next(iter(metrics), None)
    return {"kind": "lm_eval", "metric": main, "value": metrics.get(main, math.nan), "n": one["n"],
            "metrics": metrics, "items_sha256": one["items_sha256"]}


def run_tasks(lm, tasks: Sequence[str], settings: Optional[SuiteSettings] = None,
              log: Callable[[str], None] = print) -> dict:
    """{"model": lm.get_model_info(), "tasks": {name: {"kind", "metric", "value", "n", "seconds", ...}}}.

    The RULER tasks' lengths are planned first (tokenizer only): a task that cannot run fails before any task
    has spent its time."""
    s = settings or SuiteSettings()
    plans = {name: _ruler_plan(lm, name, s) for name in tasks if name in RULER_TASKS}
    report = {"model": lm.get_model_info(), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in dataclasses.asdict(s).items()}, "tasks": {}}
    for name in tasks:
        t0 = time.time()
        log(f"eval: {name} ...")
        if name in needles.TASKS:
            r = _needles(lm, name, s, log)
        elif name == "humaneval":
            r = _humaneval(lm, s, log)
        elif name in plans:
            r = _ruler(lm, name, s, plans[name], log)
        else:
            r = _lm_eval(lm, name, s)
        r["seconds"] = round(time.time() - t0, 2)
        report["tasks"][name] = r
        log(f"eval: {name}: {r['metric']} = {r['value']:.4f} ({r['seconds']:.1f} s)")
    return report


def format_table(report: dict) -> str:
    """A markdown table: one row per task (and per needle length), with the time each task took."""
    lines = ["| task | metric | value | n | seconds |", "|---|---|---|---|---|"]
    for name, r in report["tasks"].items():
        n = "" if r.get("n") is None else int(r["n"])
        lines.append(f"| {name} | {r['metric']} | {r['value']:.4f} | {n} | {r.get('seconds', 0):.1f} |")
        for length in sorted({**r.get("by_length", {}), **r.get("skipped", {})}):
            if length in r.get("skipped", {}):
                lines.append(f"| {name} @ {length} | skipped: {r['skipped'][length]} | | | |")
                continue
            acc = r["by_length"][length]
            if "grid" in r:
                depths = " ".join(f"{acc_d:.2f}" for acc_d in r["grid"][length].values())
                d = r.get("digits_by_length", {}).get(length)
                digits = "" if d is None else (f"; digits: {d['leading_digits']:.2f} leading, "
                                               f"{d['digits_in_place']:.2f} in place")
                lines.append(f"| {name} @ {length} | accuracy (by depth: {depths}{digits}) | {acc:.4f} | | |")
            else:
                lines.append(f"| {name} @ {length} | score | {acc:.4f} | | |")
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    return path
