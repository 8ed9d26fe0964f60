"""RULER's multi-value and multi-query needle items over the held-out text: every asked number in the prompt once,
each needle inside the haystack, the first at the stated depth, keys and numbers distinct, deterministic from the
seed; their scorer (the fraction of the asked numbers named), the suite's tasks and the lm-eval tasks."""

from __future__ import annotations

import dataclasses
import re

import lm_eval
import pytest
from lm_eval.api.instance import Instance

import minicpm_jax.evals as ev
from minicpm_jax.evals import TASKS_DIR, haystack, needle_score, needles, suite
from minicpm_jax.evals.harness import MiniCPMLM
from minicpm_jax.evals.needles import TEMPLATES, NeedleSpec, build_items
from minicpm_jax.evals.tasks import niah_utils
from tests.evals.test_needles import assert_needle_at_depth

DEPTHS = (0.0, 0.3, 0.5, 1.0)
SPECS = [NeedleSpec(lang="en", lengths=(512, 1024), depths=DEPTHS, samples=2, values=4),
         NeedleSpec(lang="zh", lengths=(512, 1024), depths=DEPTHS, samples=2, values=4, seed=3),
         NeedleSpec(lang="en", lengths=(512, 1024), depths=DEPTHS, samples=2, queries=4, seed=1),
         NeedleSpec(lang="zh", lengths=(512, 1024), depths=DEPTHS, samples=2, queries=4),
         # the variants take distractors too (no task uses them): those must stay unasked and unique
         NeedleSpec(lang="en", lengths=(512,), depths=DEPTHS, samples=2, queries=2, distractors=2, seed=7)]


@pytest.fixture(scope="module", params=SPECS, ids=lambda s: s.name)
def built(request, tokenizer):
    return request.param, build_items(tokenizer, request.param)


def _body(it: dict) -> str:
    """The haystack with its needles: the prompt between the intro and the question."""
    q = needles.question(it["lang"], list(dict.fromkeys(it["keys"])), multi=True)
    intro = TEMPLATES[it["lang"]]["intro"]
    assert it["prompt"].startswith(intro) and it["prompt"].endswith(q), it["id"]
    return it["prompt"][len(intro):len(it["prompt"]) - len(q)]


def _needle(it: dict, key: str, value: str) -> str:
    return TEMPLATES[it["lang"]]["needle"].format(key=key, value=value)


def test_deterministic_seeded_and_named(built, tokenizer):
    spec, items = built
    assert build_items(tokenizer, spec) == items
    other = build_items(tokenizer, dataclasses.replace(spec, seed=spec.seed + 1))
    assert [i["answers"] for i in other] != [i["answers"] for i in items]
    alone = build_items(tokenizer, dataclasses.replace(spec, lengths=spec.lengths[-1:]))
    assert alone == [i for i in items if i["length"] == spec.lengths[-1]]
    assert len(items) == len(spec.lengths) * len(spec.depths) * spec.samples
    assert len({i["id"] for i in items}) == len(items)
    assert all(i["id"].startswith(spec.name + "/") for i in items)
    # a variant draws its own items: the same cell of the one-number task holds other numbers
    single = build_items(tokenizer, dataclasses.replace(spec, values=1, queries=1, lengths=spec.lengths[:1]))
    assert not {s["id"] for s in single} & {i["id"] for i in items}
    assert all(s["answer"] != i["answer"] for s, i in zip(single, items))


def test_names_of_the_variants():
    assert NeedleSpec(values=4).name == "niah_en_mv4" and NeedleSpec(lang="zh", queries=4).name == "niah_zh_mq4"
    assert NeedleSpec(queries=2, distractors=3).name == "niah_en_mq2_d3" and NeedleSpec().name == "niah_en"
    assert NeedleSpec(values=4).answer_budget == needles.MULTI_ANSWER_TOKENS == 64
    assert NeedleSpec().answer_budget == 24 and NeedleSpec(values=4, answer_tokens=40).answer_budget == 40


def test_every_asked_number_once_and_every_needle_in_the_haystack(built):
    spec, items = built
    for it in items:
        p, body = it["prompt"], _body(it)
        assert len(it["answers"]) == len(it["keys"]) == spec.values * spec.queries
        assert it["answer"] == it["answers"][0] and it["key"] == it["keys"][0]
        assert it["needle"] == _needle(it, it["keys"][0], it["answers"][0])
        if spec.values > 1:
            assert set(it["keys"]) == {it["key"]}
        else:
            assert len(set(it["keys"])) == spec.queries
        numbers = it["answers"] + [d["value"] for d in it["distractors"]]
        assert len(set(numbers)) == len(numbers) and all(n.isdigit() and len(n) == 7 for n in numbers)
        keys = list(dict.fromkeys(it["keys"])) + [d["key"] for d in it["distractors"]]
        assert len(set(keys)) == len(keys) and len(it["distractors"]) == spec.distractors
        assert not any(a in b for a in keys for b in keys if a != b)           # no key inside another
        for n in numbers:
            assert p.count(n) == 1, (it["id"], n)
        for k, v in zip(it["keys"], it["answers"]):
            assert body.count(_needle(it, k, v)) == 1, (it["id"], k, v)
        for d in it["distractors"]:
            assert body.count(_needle(it, d["key"], d["value"])) == 1 and p.count(d["key"]) == 1
        for k in dict.fromkeys(it["keys"]):     # in its needles and twice in the question, nowhere else
            assert p.count(k) == it["keys"].count(k) + 2, (it["id"], k)
        # every 7-digit number of the prompt belongs to a needle (unless the haystack itself has one)
        assert set(numbers) <= set(re.findall(r"\d{7}", p))


def test_token_length_as_stated(built, tokenizer):
    spec, items = built
    assert spec.answer_budget == 64
    for it in items:
        assert len(tokenizer.encode(it["prompt"], add_bos=True)) == it["n_tokens"]
        assert it["n_tokens"] + spec.answer_budget <= it["length"]
        # filled: one more held-out sentence would not fit (give or take the estimate's 2 tokens)
        sents, join = haystack.sentences(spec.lang), haystack.joiner(spec.lang)
        following = sents[(it["haystack_first"] + it["haystack_sentences"]) % len(sents)]
        q = needles.question(spec.lang, list(dict.fromkeys(it["keys"])), multi=True)
        longer = it["prompt"][:-len(q)] + join + following + q
        assert len(tokenizer.encode(longer, add_bos=True)) + spec.answer_budget > it["length"] - 2, it["id"]


def test_first_needle_alone_at_the_stated_depth(built, tokenizer):
    spec, items = built
    for it in items:
        body = _body(it)
        ids = tokenizer.encode(it["prompt"], add_bos=True)
        span = tokenizer.decode(ids[it["needle_token_start"]:it["needle_token_end"]])
        assert it["needle"] in span and len(span) <= len(it["needle"]) + 4, (span, it["needle"])
        # the other needles (asked and distractors) shift the boundaries; the asked one has its boundary to itself
        others = [_needle(it, k, v) for k, v in zip(it["keys"][1:], it["answers"][1:])] + [
            _needle(it, d["key"], d["value"]) for d in it["distractors"]]
        assert_needle_at_depth(tokenizer, spec.lang, it, body, sum(len(tokenizer.encode(o)) for o in others))


def test_question_wording():
    assert needles.question("en", ["a-b"], multi=False) == TEMPLATES["en"]["question"].format(key="a-b")
    assert needles.question("en", ["a-b", "c-d", "e-f"], multi=True).startswith(
        "\nWhat are all the special magic numbers for a-b, c-d, and e-f mentioned in the provided text?\n"
        "Answer: The special magic numbers for a-b, c-d, and e-f mentioned in the provided text are:")
    assert "for a-b and c-d mentioned" in needles.question("en", ["a-b", "c-d"], multi=True)
    zh = needles.question("zh", ["金色的灯塔", "银色的罗盘", "安静的风筝"], multi=True)
    assert zh.count("金色的灯塔、银色的罗盘和安静的风筝") == 2 and zh.endswith("：")


def test_scorer_takes_the_fraction_of_the_asked_numbers(built):
    spec, items = built
    oracle = needle_score.score(items, [" " + ", ".join(it["answers"]) + "." for it in items])
    assert oracle["accuracy"] == 1.0 and all(oracle["correct"]) and oracle["scores"] == [1.0] * len(items)
    assert all(v == 1.0 for row in oracle["grid"].values() for v in row.values())
    assert not any(it["answers"].count("1234567") for it in items)
    fixed = needle_score.score(items, ["1234567"] * len(items))
    assert fixed["accuracy"] == 0.0 and fixed["scores"] == [0.0] * len(items)
    # half of each item's numbers, in reverse order (order is free)
    half = needle_score.score(items, [" ".join(it["answers"][len(it["answers"]) // 2:][::-1]) for it in items])
    assert half["accuracy"] == pytest.approx(0.5) and not any(half["correct"])
    assert all(v == pytest.approx(0.5) for v in half["by_length"].values())
    # all right on every other item, one number on the rest
    mixed = needle_score.score(items, [" ".join(it["answers"]) if i % 2 == 0 else it["answers"][-1]
                                       for i, it in enumerate(items)])
    n_right = sum(1 for i in range(len(items)) if i % 2 == 0)
    one = 1 / len(items[0]["answers"])
    assert mixed["accuracy"] == pytest.approx((n_right + (len(items) - n_right) * one) / len(items))
    assert mixed["correct"] == [i % 2 == 0 for i in range(len(items))]
    assert set(mixed["grid"]) == set(spec.lengths) and all(set(r) == set(spec.depths) for r in mixed["grid"].values())
    # the digit diagnostics are for one-number items only: none here
    assert not {"leading_digits", "digits_in_place", "digits_by_length"} & set(oracle)
    if spec.distractors:       # naming a distractor's number voids the answer, as for one number
        greedy = needle_score.score(items, [" ".join(it["answers"] + [it["distractors"][0]["value"]]) for it in items])
        assert greedy["accuracy"] == 0.0


def test_digit_diagnostics_skip_the_items_asking_for_several_numbers():
    single = {"answer": "2181950", "length": 1024, "depth": 0.0, "distractors": []}
    multi = {"answer": "5050600", "answers": ["5050600", "1111111"], "length": 1024, "depth": 0.0,
             "distractors": []}
    r = needle_score.score([single, multi], [" 1891950.", " 1111111, 5050600."])
    assert r["scores"] == [0.0, 1.0] and r["accuracy"] == 0.5 and r["correct"] == [False, True]
    # against the first answer the right list above would read 0 leading digits; it is left out instead
    assert r["leading_digits"] == 0 and r["digits_in_place"] == pytest.approx(4 / 7)
    assert r["digits_by_length"] == {1024: {"leading_digits": 0, "digits_in_place": pytest.approx(4 / 7)}}
    assert needle_score.item_score(multi, "5050600") == 0.5 and not needle_score.is_correct(multi, "5050600")
    table = suite.format_table({"tasks": {"niah_en_multivalue": {
        "metric": "accuracy", "value": 0.5, "n": 1, **needle_score.score([multi], ["5050600"])}}})
    assert "| niah_en_multivalue @ 1024 | accuracy (by depth: 0.50) | 0.5000 | | |" in table.splitlines()


def test_spec_errors():
    with pytest.raises(ValueError, match="values and NeedleSpec.queries"):
        NeedleSpec(values=4, queries=4)
    with pytest.raises(ValueError, match="NeedleSpec.values"):
        NeedleSpec(values=0)
    with pytest.raises(ValueError, match="NeedleSpec.values and NeedleSpec.queries"):
        NeedleSpec(queries=0)
    with pytest.raises(ValueError, match="queries \\+ distractors"):
        NeedleSpec(lang="zh", queries=60, distractors=20)
    with pytest.raises(ValueError, match="answer_tokens"):
        NeedleSpec(values=4, answer_tokens=0)


def test_each_suite_needle_task_has_its_lm_eval_task_with_the_same_answer_budget():
    """minicpm_niah_<x>.yaml for each suite task niah_<x>, building the same spec with max_gen_toks = its budget."""
    yamls = {p.stem.removeprefix("minicpm_"): p.read_text() for p in TASKS_DIR.glob("minicpm_niah_*.yaml")}
    assert set(yamls) == set(needles.TASKS)
    for name, fields in needles.TASKS.items():
        y = yamls[name]
        assert f"task: minicpm_{name}\n" in y and f"custom_dataset: !function niah_utils.{name}\n" in y
        assert callable(getattr(niah_utils, name))
        budget = NeedleSpec(**fields).answer_budget
        assert re.search(r"max_gen_toks: (\d+)", y).group(1) == str(budget), name


def test_lm_eval_builder_and_process_results(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    kw = {"tokenizer": str(tmp_path / "tok"), "max_seq_lengths": [1024], "depths": [0.5], "niah_samples": 2,
          "seed": 4}
    docs = list(niah_utils.niah_zh_multivalue(**kw)["test"])
    items = build_items(tokenizer, NeedleSpec(lang="zh", lengths=(1024,), depths=(0.5,), samples=2, seed=4,
                                              values=4))
    assert [d["id"] for d in docs] == [i["id"] for i in items] and [d["answers"] for d in docs] == [
        i["answers"] for i in items]
    r = niah_utils.process_results(docs[0], [" ".join(docs[0]["answers"][:2])])
    assert r["acc"] == 0.5 and r["1024"] == 0.5 and r["2048"] == -1.0
    assert niah_utils.process_results(docs[1], [" ".join(docs[1]["answers"])])["acc"] == 1.0


@pytest.fixture(scope="module")
def tiny_lm(tiny):
    return MiniCPMLM(pretrained=str(tiny.hf_dir), batch_size=4)


class _Recording:
    """The model, recording its generate_until requests; `answer(item, i)` replaces its text when given."""

    def __init__(self, lm, answer=None):
        self.lm, self.answer, self.requests = lm, answer, []

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def generate_until(self, requests):
        self.requests += list(requests)
        if self.answer is not None:
            return [self.answer(r.doc, i) for i, r in enumerate(requests)]
        return self.lm.generate_until(requests)


def test_suite_runs_the_multi_tasks(tiny_lm, tmp_path):
    s = suite.SuiteSettings(lengths=(512,), depths=(0.0, 1.0), samples=1, out_dir=tmp_path)
    lm = _Recording(tiny_lm)
    report = suite.run_tasks(lm, ["niah_en_multivalue", "niah_zh_multiquery"], s, log=lambda m: None)
    assert {r.arguments[1]["max_gen_toks"] for r in lm.requests} == {64}
    for name in ("niah_en_multivalue", "niah_zh_multiquery"):
        r = report["tasks"][name]
        items = needles.read_jsonl(tmp_path / f"{name}.items.jsonl")
        preds = needles.read_jsonl(tmp_path / f"{name}.predictions.jsonl")
        assert r["kind"] == "needle" and r["n"] == len(items) == 2 and all(len(i["answers"]) == 4 for i in items)
        scores = [needle_score.item_score(i, p["prediction"]) for i, p in zip(items, preds)]
        assert [p["score"] for p in preds] == scores and r["value"] == pytest.approx(sum(scores) / 2)
        # copying the prompt's first 7-digit number names one of the four (no haystack number comes first here)
        assert all(re.findall(r"\d{7}", i["prompt"])[0] in i["answers"] for i in items)
        assert r["floor_first_number"] == 0.25
        assert "digits_by_length" not in r and list(r["grid"]) == [512]


def test_suite_scores_a_model_that_names_some_of_the_numbers(tiny_lm):
    """All four numbers on the first item, the first two on the second: 1.0 and 0.5, by depth."""
    lm = _Recording(tiny_lm, answer=lambda it, i: " " + ", ".join(it["answers"][:4 if i == 0 else 2]) + ".")
    s = suite.SuiteSettings(lengths=(512,), depths=(0.0, 1.0), samples=1)
    r = suite.run_tasks(lm, ["niah_en_multiquery"], s, log=lambda m: None)["tasks"]["niah_en_multiquery"]
    assert r["value"] == 0.75 and r["grid"] == {512: {0.0: 1.0, 1.0: 0.5}} and r["by_depth"] == {0.0: 1.0, 1.0: 0.5}


def test_lm_eval_multi_task_scores_our_generations(tiny, tiny_lm):
    meta = {"max_seq_lengths": [1024], "depths": [0.0, 1.0], "niah_samples": 1, "seed": 3}
    args = {"pretrained": str(tiny.hf_dir), "batch_size": 4}
    res = lm_eval.simple_evaluate(model="minicpm_jax", model_args=args, tasks=["minicpm_niah_en_multiquery"],
                                  task_manager=ev.task_manager({**args, **meta}), bootstrap_iters=0)
    items = build_items(tiny.tokenizer, NeedleSpec(lang="en", lengths=(1024,), depths=(0.0, 1.0), samples=1, seed=3,
                                                   queries=4))
    samples = sorted(res["samples"]["minicpm_niah_en_multiquery"], key=lambda s: s["doc_id"])
    assert [s["doc"]["id"] for s in samples] == [it["id"] for it in items]
    assert [s["target"] for s in samples] == [", ".join(it["answers"]) for it in items]
    ours = tiny_lm.generate_until([Instance("generate_until", it, (it["prompt"], {"until": ["\n"], "max_gen_toks": 64}),
                                            i) for i, it in enumerate(items)])
    assert [s["resps"][0][0] for s in samples] == ours
    scores = [needle_score.item_score(it, o) for it, o in zip(items, ours)]
    assert [s["acc"] for s in samples] == scores
    r = res["results"]["minicpm_niah_en_multiquery"]
    assert r["acc,none"] == pytest.approx(sum(scores) / 2) and r["1024,none"] == r["acc,none"]
    assert r["2048,none"] == -1.0
