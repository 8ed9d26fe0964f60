"""lm-eval's own RULER tasks that need no download run through the minicpm_jax backend (`minicpm eval --tasks`
path): the scores lm-eval reports are RULER's string match of our generations on its documents; and the lengths
where lm-eval's generators cannot build a task with the run's tokenizer (they hang, or build items with no answer)
are refused beforehand with the reason, leaving lm-eval's random draws as they were."""

from __future__ import annotations

import importlib
import json
import random

import numpy as np
import pytest

pytest.importorskip("transformers", reason="lm-eval's RULER tasks size their contexts with transformers")
pytest.importorskip("wonderwords", reason="lm-eval's RULER tasks draw their keys with wonderwords")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks.ruler import vt_utils  # noqa: E402

import minicpm_jax as mc  # noqa: E402
from minicpm_jax.evals import haystack, ruler_sizing  # noqa: E402
from minicpm_jax.evals.compare import comparison_report, format_comparison  # noqa: E402
from minicpm_jax.evals.harness import MiniCPMLM  # noqa: E402
from minicpm_jax.evals.suite import SuiteSettings, run_tasks  # noqa: E402
from tests.evals.conftest import random_params, tiny_cfg  # noqa: E402

RULER_POSITIONS = 2304      # 2048 + room for fwe's 50 answer tokens past its full-length text


@pytest.fixture(scope="module")
def wide_vocab(tmp_path_factory):
    """A 4000-piece tokenizer on all the held-out text (the 1000-piece fixture spends too many tokens on
    ruler_vt's in-context example for lm-eval to build it at all) and a random 2-layer model over it, as an HF
    dir with 2304 positions."""
    from data_pipeline.tokenizer import train_sentencepiece

    tok = train_sentencepiece(list(haystack.sentences("en")) + list(haystack.sentences("zh")), 4000)
    cfg = tiny_cfg(vocab_size=4096, max_position_embeddings=RULER_POSITIONS)
    hf = tmp_path_factory.mktemp("ruler-model") / "hf"
    mc.save_hf(hf, cfg, random_params(cfg, 3))
    tok.save(hf)
    return hf


def _string_match_all(prediction: str, refs: list[str]) -> float:
    """RULER's per-item score, written out here: the fraction of references inside the stripped prediction."""
    return sum(r.lower() in prediction.strip().lower() for r in refs) / len(refs)


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_ruler_niah_single_1_through_the_suite(tiny, tmp_path):
    lm = MiniCPMLM(pretrained=str(tiny.hf_dir), batch_size=4)
    report = run_tasks(lm, ["niah_single_1"], SuiteSettings(lengths=(1024, 2048), limit=2, out_dir=tmp_path),
                       log=lambda m: None)
    r = report["tasks"]["niah_single_1"]
    assert r["n"] == 2 and r["metric"] == "mean over lengths" and list(r["by_length"]) == [1024]
    assert r["skipped"] == {2048: "exceeds the model's 1024 positions"}
    assert r["value"] == r["by_length"][1024] and 0.0 <= r["value"] <= 1.0

    # the generations are ours, and lm-eval's score is RULER's string match on them
    samples = _read(tmp_path / "niah_single_1@1024.samples.jsonl")
    assert len(samples) == 2
    gens = lm.generate_until([Instance("generate_until", s["doc"], tuple(s["arguments"][0]), i)
                              for i, s in enumerate(samples)])
    assert [s["responses"][0] for s in samples] == gens
    for s, g in zip(samples, gens):
        assert s["1024"] == _string_match_all(g, s["doc"]["outputs"])
    assert r["by_length"][1024] == sum(s["1024"] for s in samples) / 2


@pytest.mark.timeout(300)     # a missed check hangs in lm-eval's generator
def test_ruler_vt_cwe_fwe_through_the_suite(wide_vocab, tmp_path):
    """Variable tracking, common- and frequent-word extraction at 1K and 2K: vt and cwe cannot be built at 1K with
    this tokenizer and are skipped with the reason; every item that runs is scored as RULER scores it."""
    lm = MiniCPMLM(pretrained=str(wide_vocab), batch_size=2)
    logs = []
    report = run_tasks(lm, ["ruler_vt", "ruler_cwe", "ruler_fwe"],
                       SuiteSettings(lengths=(1024, 2048), limit=2, out_dir=tmp_path), log=logs.append)
    for name, ran, answers in (("ruler_vt", [2048], 5), ("ruler_cwe", [2048], 10), ("ruler_fwe", [1024, 2048], 3)):
        r = report["tasks"][name]
        assert list(r["by_length"]) == ran and r["n"] == 2 * len(ran), name
        for length in ran:
            samples = _read(tmp_path / f"{name}@{length}.samples.jsonl")
            assert len(samples) == 2
            for s in samples:
                assert s["doc"]["max_length"] == length and len(s["doc"]["outputs"]) == answers
                # every reference is really in the context (the task is answerable), and the score is RULER's
                assert all(ref in s["arguments"][0][0] for ref in s["doc"]["outputs"]), (name, length)
                assert s[str(length)] == _string_match_all(s["responses"][0], s["doc"]["outputs"])
            assert r["by_length"][length] == pytest.approx(sum(s[str(length)] for s in samples) / 2)
    assert set(report["tasks"]["ruler_vt"]["skipped"]) == {1024}
    assert "loop forever" in report["tasks"]["ruler_vt"]["skipped"][1024]
    assert "no answer" in report["tasks"]["ruler_cwe"]["skipped"][1024]
    assert report["tasks"]["ruler_fwe"]["skipped"] == {}
    assert any("ruler_vt @ 1024: skipped" in m for m in logs)

    # lm-eval never reseeds cwe's module RNG: a second build in this process asks the same items all the same
    again = run_tasks(lm, ["ruler_cwe"], SuiteSettings(lengths=(2048,), limit=2), log=lambda m: None)
    assert again["tasks"]["ruler_cwe"]["items_sha256"] == report["tasks"]["ruler_cwe"]["items_sha256"]


def test_sizing_refuses_what_lm_eval_cannot_build(tiny, wide_vocab):
    """The check against lm-eval's own generators: where it refuses cwe, lm-eval builds items with no answer;
    where it accepts, every item has its ten. vt with the 1000-piece tokenizer is refused at every length (lm-eval
    would loop forever, so it is not run), and with the 4000-piece one it is built where accepted."""
    small = str(tiny.hf_dir)
    why = ruler_sizing.problem("ruler_vt", small, 4096)
    assert "in-context example" in why and "at any length" in why
    assert ruler_sizing.problem("ruler_cwe", small, 1024) is not None
    assert ruler_sizing.problem("ruler_cwe", small, 2048) is None
    assert ruler_sizing.problem("ruler_fwe", small, 1024) is None          # needs no check
    assert ruler_sizing.problem("niah_single_1", small, 1024) is None

    cwe_utils = _cwe_utils()

    def cwe_answers(length):
        return [len(d["outputs"]) for d in cwe_utils.get_cw_dataset(tokenizer=small, max_seq_lengths=[length])["test"]]

    assert set(cwe_answers(1024)) == {0}
    assert set(cwe_answers(2048)) == {10}
    assert ruler_sizing.problem("ruler_vt", str(wide_vocab), 2048) is None
    built = vt_utils.get_vt_dataset(tokenizer=str(wide_vocab), max_seq_lengths=[2048])["test"]
    assert len(built) == 500 and all(len(d["outputs"]) == 5 for d in built)


def _cwe_utils():
    """The module lm-eval's task loader builds cwe items with (it re-executes task modules into sys.modules)."""
    return importlib.import_module("lm_eval.tasks.ruler.cwe_utils")


def test_sizing_leaves_lm_eval_draws_alone(tiny):
    small = str(tiny.hf_dir)
    cwe_utils = _cwe_utils()

    def states():
        return random.getstate(), np.random.get_state(), cwe_utils.RNG.getstate()

    for task, length in (("ruler_vt", 2048), ("ruler_cwe", 1024), ("ruler_cwe", 2048)):   # refused and accepted
        before = states()
        ruler_sizing.problem(task, small, length)
        after = states()
        assert before[0] == after[0] and before[2] == after[2], task
        assert all(np.array_equal(a, b) for a, b in zip(before[1], after[1])), task

    def build():
        random.seed(7)
        np.random.seed(7)
        return cwe_utils.get_cw_dataset(tokenizer=small, max_seq_lengths=[2048])["test"]["input"][:3]

    state = cwe_utils.RNG.getstate()
    first = build()
    cwe_utils.RNG.setstate(state)
    random.seed(7)
    np.random.seed(7)
    for task in ("ruler_vt", "ruler_cwe"):
        ruler_sizing.problem(task, small, 2048)
    second = cwe_utils.get_cw_dataset(tokenizer=small, max_seq_lengths=[2048])["test"]["input"][:3]
    assert first == second


def test_ruler_on_a_gguf_uses_the_checkpoints_tokenizer(tiny, tiny_gguf, tmp_path):
    """A GGUF has no transformers tokenizer to size RULER items: alone it is refused with the remedy; given the
    checkpoint's (as `minicpm eval --checkpoint --gguf` does), it is asked exactly the JAX model's items."""
    from minicpm_jax.evals.gguf_harness import GGUFLM

    gguf = GGUFLM(pretrained=str(tiny_gguf.f32), n_threads=1)
    logs = []
    with pytest.raises(ValueError, match="niah_single_1: .*has none beside it.*--checkpoint"):
        run_tasks(gguf, ["niah_en", "niah_single_1"], SuiteSettings(lengths=(1024,), limit=2), log=logs.append)
    assert logs == []           # refused before the first task spent its time
    docs, reports = {}, {}
    for label, lm in (("jax", MiniCPMLM(pretrained=str(tiny.hf_dir), batch_size=2)), ("gguf", gguf)):
        reports[label] = run_tasks(lm, ["niah_single_1"], SuiteSettings(
            lengths=(1024, 2048), limit=2, out_dir=tmp_path / label, ruler_tokenizer=str(tiny.hf_dir)),
            log=lambda m: None)
        docs[label] = [s["doc"] for s in _read(tmp_path / label / "niah_single_1@1024.samples.jsonl")]
    assert len(docs["jax"]) == 2 and docs["jax"] == docs["gguf"]
    comp = comparison_report(reports)
    assert comp["mismatched_items"] == []
    table = format_comparison(comp)
    assert "| niah_single_1 @ 1024 | score |" in table and "| niah_single_1 @ 2048 | skipped |" in table, table

    # a model asked other items is flagged
    reports["gguf"]["tasks"]["niah_single_1"]["items_sha256"] = "0" * 64
    assert comparison_report(reports)["mismatched_items"] == ["niah_single_1"]
