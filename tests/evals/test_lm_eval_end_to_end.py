"""Shipped offline lm-eval tasks (YAML under minicpm_jax/evals/tasks) run end to end through
`lm_eval.simple_evaluate(model="minicpm_jax", ...)` on an HF directory and on a training run's checkpoint steps, and
the numbers lm-eval reports are the ones our own scoring and generation give for the same documents."""

from __future__ import annotations

import lm_eval
import pytest

import minicpm_jax.evals as ev
from minicpm_jax.evals.cloze import cloze_items
from minicpm_jax.evals.harness import MiniCPMLM
from minicpm_jax.evals.needle_score import is_correct
from minicpm_jax.evals.needles import NeedleSpec, build_items

META = {"max_seq_lengths": [1024], "depths": [0.0, 1.0], "niah_samples": 1, "cloze_samples": 6, "seed": 3}


def evaluate(model_args: dict, tasks: list[str]):
    return lm_eval.simple_evaluate(model="minicpm_jax", model_args=model_args, tasks=tasks,
                                   task_manager=ev.task_manager({**model_args, **META}), bootstrap_iters=0)


@pytest.fixture(scope="module")
def hf_result(tiny):
    return evaluate({"pretrained": str(tiny.hf_dir), "batch_size": 4}, ["minicpm_cloze_en", "minicpm_niah_en"])


def test_cloze_accuracy_is_our_loglikelihood_argmax(hf_result, tiny):
    docs = cloze_items(n=6, seed=3)
    samples = sorted(hf_result["samples"]["minicpm_cloze_en"], key=lambda s: s["doc_id"])
    assert [s["doc"]["id"] for s in samples] == [d["id"] for d in docs]
    lm = MiniCPMLM(pretrained=str(tiny.hf_dir))
    from lm_eval.api.instance import Instance

    right = 0
    for d in docs:
        scores = lm.loglikelihood([Instance("loglikelihood", d, (d["context"], " " + c), i)
                                   for i, c in enumerate(d["choices"])])
        lps = [lp for lp, _ in scores]
        right += int(lps.index(max(lps)) == d["label"])
    assert hf_result["results"]["minicpm_cloze_en"]["acc,none"] == pytest.approx(right / len(docs))


def test_needle_task_scores_our_generations(hf_result, tiny):
    spec = NeedleSpec(lang="en", lengths=(1024,), depths=(0.0, 1.0), samples=1, seed=3)
    items = build_items(tiny.tokenizer, spec)
    samples = sorted(hf_result["samples"]["minicpm_niah_en"], key=lambda s: s["doc_id"])
    assert [s["doc"]["id"] for s in samples] == [it["id"] for it in items]
    lm = MiniCPMLM(pretrained=str(tiny.hf_dir))
    from lm_eval.api.instance import Instance

    ours = lm.generate_until([Instance("generate_until", it, (it["prompt"], {"until": ["\n"], "max_gen_toks": 24}), i)
                              for i, it in enumerate(items)])
    assert [s["resps"][0][0] for s in samples] == ours
    accs = [float(is_correct(it, o)) for it, o in zip(items, ours)]
    assert [s["acc"] for s in samples] == accs
    res = hf_result["results"]["minicpm_niah_en"]
    assert res["acc,none"] == pytest.approx(sum(accs) / len(accs)) and res["1024,none"] == res["acc,none"]
    assert res["2048,none"] == -1.0                      # no item of that length was built


def test_run_directory_and_checkpoint_step(tiny, hf_result):
    """step=2 of the run holds the HF directory's weights, step=1 others: the same task scores accordingly."""
    hf = [s["resps"] for s in sorted(hf_result["samples"]["minicpm_cloze_en"], key=lambda s: s["doc_id"])]
    runs = {}
    for step in (1, 2):
        r = evaluate({"pretrained": str(tiny.run_dir), "step": step, "batch_size": 4}, ["minicpm_cloze_en"])
        runs[step] = [s["resps"] for s in sorted(r["samples"]["minicpm_cloze_en"], key=lambda s: s["doc_id"])]
        assert r["config"]["checkpoint_step"] == step
    assert _close(runs[2], hf)
    assert not _close(runs[1], hf)


def _close(a, b, tol=1e-4) -> bool:
    flat = lambda r: [float(x[0][0]) for doc in r for x in doc]   # noqa: E731  (logprob, is_greedy) per choice
    return all(abs(x - y) <= tol for x, y in zip(flat(a), flat(b))) and len(flat(a)) == len(flat(b))
