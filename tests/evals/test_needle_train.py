"""Needle-retrieval training records (data_pipeline.needle_train): deterministic, built from training text that the
needle eval never uses, keys disjoint from the eval's, needles and answers where the item says, and a loss mask on
exactly the answer tokens (and the final EOS)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from data_pipeline import needle_train as N
from data_pipeline import records
from data_pipeline.pipeline import TokenizeDocument
from minicpm_jax.evals import haystack, needles

SPEC = N.NeedleTrainSpec(items=12, min_tokens=640, max_tokens=1000, max_needles=3, seed=3)


@pytest.fixture(scope="module")
def sents():
    return N.training_sentences()


@pytest.fixture(scope="module")
def items(tokenizer, sents):
    return N.build_items(tokenizer, SPEC, sents)


def test_deterministic_and_seeded(tokenizer, sents, items):
    again = N.build_items(tokenizer, SPEC, sents)
    assert [it["id"] for it in again] == [it["id"] for it in items]
    for a, b in zip(items, again):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    other = N.build_items(tokenizer, N.NeedleTrainSpec(items=3, min_tokens=640, max_tokens=1000, seed=4), sents)
    assert all(not np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(items, other))


def test_haystack_text_is_disjoint_from_the_eval_haystack(sents):
    train = set(sents)
    assert len(train) > 10_000
    assert not train & set(haystack.sentences("en"))
    # and from the eval tail itself, whatever the sentence splitter does: no eval-tail unit is a training unit
    tail = haystack._wiki_tail()
    assert not any(s in u for u in tail[:200] for s in list(train)[:200])


def test_keys_and_wording(items):
    eval_words = set(needles.EN_ADJ) | set(needles.EN_NOUN)
    assert not (set(N.ADJ) | set(N.NOUN)) & eval_words
    tpl = needles.TEMPLATES["en"]
    assert (N.INTRO, N.NEEDLE, N.QUESTION) == (tpl["intro"], tpl["needle"], tpl["question"])
    for it in items:
        for a in it["answers"]:
            adj, noun = a["key"].split("-")
            assert adj in N.ADJ and noun in N.NOUN


def test_lengths_and_needles_in_place(tokenizer, sents, items):
    checked = 0
    for it in items:
        toks = [int(t) for t in it["tokens"]]
        assert SPEC.min_tokens - 150 <= len(toks) <= it["length"] <= SPEC.max_tokens
        assert toks[0] == tokenizer.bos_id and toks[-1] == tokenizer.eos_id
        hay = tokenizer.decode(toks[it["haystack_token_start"]:it["haystack_token_end"]])
        keys = [a["key"] for a in it["answers"]]
        assert sorted(n["key"] for n in it["needles"]) == sorted(keys)
        for n in it["needles"]:
            text = tokenizer.decode(toks[n["token_start"]:n["token_end"]]).strip()
            assert text == f"One of the special magic numbers for {n['key']} is: {n['value']}."
            assert hay.count(n["value"]) == 1 and hay.count(n["key"]) == 1
        # the depth needle sits at the sentence boundary nearest the depth: within a sentence or so of the
        # haystack's tokens once the haystack has a few sentences (with one or two, only 0 and 1 exist)
        if it["haystack_sentences"] < 6:
            continue
        checked += 1
        n = next(n for n in it["needles"] if n["key"] == it["depth_key"])
        others = sum(m["token_end"] - m["token_start"] for m in it["needles"] if m["token_start"] < n["token_start"])
        span = it["haystack_token_end"] - it["haystack_token_start"] - sum(
            m["token_end"] - m["token_start"] for m in it["needles"])
        measured = (n["token_start"] - it["haystack_token_start"] - others) / span
        longest = max(len(tokenizer.encode(sents[(it["haystack_first"] + j) % len(sents)]))
                      for j in range(it["haystack_sentences"]))
        assert abs(measured - it["depth"]) <= 0.5 * longest / span + 0.03, (it["id"], measured, it["depth"])
    assert checked >= len(items) // 2


def test_questions_then_answers(tokenizer, items):
    for it in items:
        toks = [int(t) for t in it["tokens"]]
        start = it["haystack_token_end"]
        for a in it["answers"]:
            q = tokenizer.decode(toks[start:a["token_start"]])
            assert re.fullmatch(r"\s*What is the special magic number for (\S+) mentioned in the provided text\?\s*"
                                r"Answer: The special magic number for (\S+) is:", q), q
            assert q.count(a["key"]) == 2
            assert tokenizer.decode(toks[a["token_start"]:a["token_end"]]) == f" {a['value']}."
            start = a["token_end"]
        assert start == len(toks) - 1                          # then only the EOS


def test_mask_is_exactly_the_answers_and_eos(items):
    for it in items:
        want = np.zeros(len(it["tokens"]), np.uint8)
        for a in it["answers"]:
            want[a["token_start"]:a["token_end"]] = 1
        want[-1] = 1
        np.testing.assert_array_equal(it["mask"], want)


def test_records_round_trip_into_the_loss_mask(tmp_path, tokenizer, sents):
    spec = N.NeedleTrainSpec(items=3, min_tokens=640, max_tokens=800, max_needles=2, seed=5)
    summary = N.write_records(tmp_path, tokenizer, spec, sents)
    items = N.build_items(tokenizer, spec, sents)
    paths = sorted((tmp_path / "tokens" / "train").glob("needle_train_en-*.array_record"))
    assert [str(p) for p in paths] == summary["shards"]
    recs = [records.decode_record(r) for r in records.read_shards(paths)]
    assert len(recs) == 3 and summary["answer_tokens"] == sum(int(it["mask"].sum()) for it in items)
    for rec, it in zip(recs, items):
        row = TokenizeDocument(None).map(rec)
        np.testing.assert_array_equal(row["tokens"], it["tokens"])
        np.testing.assert_array_equal(row["loss_mask"], it["mask"].astype(np.int32))


def test_short_lengths_take_fewer_needles(tokenizer, sents):
    spec = N.NeedleTrainSpec(items=6, min_tokens=300, max_tokens=400, max_needles=8, seed=6)
    items = N.build_items(tokenizer, spec, sents)
    assert all(1 <= len(it["answers"]) < 8 and len(it["tokens"]) <= it["length"] for it in items)
