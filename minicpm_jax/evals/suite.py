"""Run a list of evaluation tasks on one loaded model and collect one report (what `minicpm eval --tasks` prints).

Task names:
  niah_en, niah_zh                    needle in a haystack of held-out text (`needles.py`), scored per length x depth
  niah_en_multikey, niah_zh_multikey  the same with 3 distractor needles
  niah_{en,zh}_multivalue            one key with 4 numbers, all asked for (RULER's multi-value)
  niah_{en,zh}_multiquery            4 keys with a number each, all asked for (RULER's multi-query)
  humaneval                           HumanEval pass@1 (`humaneval.py`)
  anything else                       an lm-eval task: ours (`tasks/`: minicpm_cloze_en, minicpm_niah_*) or any of
                                      lm-eval's own that needs no download (their index is loaded only then), e.g.
                                      RULER's niah_single_1, niah_multikey_2, niah_multikey_3, ruler_vt, ruler_fwe
                                      (ruler_cwe's own generator raises ZeroDivisionError at some lengths with the
                                      tiny run's tokenizer: 1024 and 4096 fail, 2048 runs)

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

from minicpm_jax.evals import needle_score, needles
from minicpm_jax.evals.needles import NeedleSpec

# task -> (lang, distractors, values, queries) of its NeedleSpec; multivalue / multiquery are RULER's (4 each)
NEEDLE_TASKS = {"niah_en": ("en", 0, 1, 1), "niah_zh": ("zh", 0, 1, 1), "niah_en_multikey": ("en", 3, 1, 1),
                "niah_zh_multikey": ("zh", 3, 1, 1), "niah_en_multivalue": ("en", 0, 4, 1),
                "niah_zh_multivalue": ("zh", 0, 4, 1), "niah_en_multiquery": ("en", 0, 1, 4),
                "niah_zh_multiquery": ("zh", 0, 1, 4)}
DEFAULT_LENGTHS = (1024, 2048, 4096)


@dataclasses.dataclass
class SuiteSettings:
    """lengths / depths / samples: the needle grid (lengths above the model's window are dropped); limit: items per
    lm-eval task and HumanEval problems (None = all); out_dir: where item and prediction JSONL go (None = nowhere)."""

    lengths: Sequence[int] = DEFAULT_LENGTHS
    depths: Sequence[float] = NeedleSpec.depths
    samples: int = 4
    limit: Optional[int] = None
    seed: int = 0
    out_dir: Optional[Path] = None


def _needles(lm, name: str, s: SuiteSettings, log: Callable[[str], None]) -> dict:
    lang, distractors, values, queries = NEEDLE_TASKS[name]
    lengths = tuple(n for n in s.lengths if n <= lm.max_length)
    if len(lengths) < len(s.lengths):
        log(f"{name}: lengths {[n for n in s.lengths if n > lm.max_length]} exceed the model's {lm.max_length} "
            "positions; skipped")
    if not lengths:
        raise ValueError(f"{name}: no length fits the model's {lm.max_length} positions (asked {list(s.lengths)})")
    spec = NeedleSpec(lang=lang, lengths=lengths, depths=tuple(s.depths), samples=s.samples,
                      distractors=distractors, values=values, queries=queries, seed=s.seed)
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


def _lm_eval_once(lm, name: str, s: SuiteSettings, lengths: list[int]) -> dict:
    import lm_eval

    from minicpm_jax.evals import TASKS_DIR, task_manager

    ours = (TASKS_DIR / f"{name}.yaml").is_file()
    meta = {"pretrained": lm.source, "max_seq_lengths": lengths, "depths": list(s.depths),
            "niah_samples": s.samples, "seed": s.seed}
    # lm-eval's RULER tasks size contexts with transformers' AutoTokenizer (a directory); a GGUF has none beside it
    if lm.tokenizer.path is not None and getattr(lm.tokenizer, "kind", None) != "gguf":
        meta["tokenizer"] = str(Path(lm.tokenizer.path).parent)
    if s.limit:
        meta["cloze_samples"] = s.limit
    r = lm_eval.simple_evaluate(model=lm, tasks=[name], limit=s.limit, bootstrap_iters=0, log_samples=False,
                                task_manager=task_manager(meta, include_defaults=not ours))
    if r is None or name not in r["results"]:
        raise ValueError(f"lm-eval returned no results for task {name!r}")
    metrics = {k.split(",")[0]: v for k, v in r["results"][name].items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    return {"metrics": metrics, "n": r.get("n-samples", {}).get(name, {}).get("effective")}


def _lm_eval(lm, name: str, s: SuiteSettings, log) -> dict:
    lengths = [n for n in s.lengths if n <= lm.max_length]
    if name in RULER_TASKS:      # one run per length: RULER aggregates undeclared (short) lengths over all items
        if not lengths:
            raise ValueError(f"{name}: no length fits the model's {lm.max_length} positions (asked {list(s.lengths)})")
        by_length, n, metrics = {}, 0, {}
        for length in lengths:
            one = _lm_eval_once(lm, name, s, [length])
            by_length[length] = one["metrics"][str(length)]
            n += one["n"] or 0
            metrics[str(length)] = by_length[length]
            log(f"eval: {name} @ {length}: {by_length[length]:.4f}")
        return {"kind": "lm_eval", "metric": "mean over lengths", "value": sum(by_length.values()) / len(by_length),
                "n": n, "metrics": metrics, "by_length": by_length}
    one = _lm_eval_once(lm, name, s, lengths)
    metrics = one["metrics"]
    main = "acc" if "acc" in metrics else next(iter(metrics), None)
    return {"kind": "lm_eval", "metric": main, "value": metrics.get(main, math.nan), "n": one["n"],
            "metrics": metrics}


def run_tasks(lm, tasks: Sequence[str], settings: Optional[SuiteSettings] = None,
              log: Callable[[str], None] = print) -> dict:
    """{"model": lm.get_model_info(), "tasks": {name: {"kind", "metric", "value", "n", "seconds", ...}}}."""
    s = settings or SuiteSettings()
    report = {"model": lm.get_model_info(), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in dataclasses.asdict(s).items()}, "tasks": {}}
    for name in tasks:
        t0 = time.time()
        log(f"eval: {name} ...")
        if name in NEEDLE_TASKS:
            r = _needles(lm, name, s, log)
        elif name == "humaneval":
            r = _humaneval(lm, s, log)
        else:
            r = _lm_eval(lm, name, s, log)
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
        for length, acc in r.get("by_length", {}).items():
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
