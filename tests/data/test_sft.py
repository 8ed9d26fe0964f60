"""SFT data: QA parsing, ChatML conversations, assistant-only loss mask through packing."""

from __future__ import annotations

import collections
import json

import pytest

from data_pipeline import records
from data_pipeline.packing import unpack_rows
from data_pipeline.pipeline import make_train_iterator
from data_pipeline.sft import parse_debian_faq, parse_rst_faq, unwrap
from tests.data.conftest import take_all

# Format samples written for these tests (the real FAQs come from Debian packages and are never committed).
RST = """\
==========
Sample FAQ
==========

General
=======

Why is the sky blue?
--------------------

Sunlight is scattered by the air, and blue light is scattered more
than red light. See :ref:`optics <optics-label>` and ``rayleigh()``.

.. note::
   The directive line goes, its body stays.

A heading that is not a question
--------------------------------

Body text.

How do I boil an egg?
---------------------

Put it in boiling water for seven
minutes.
"""

DEBIAN_TXT = "Chapter\u00a01.\u00a0Basics\n\n1.1.\u00a0What is a package?\n\n    A package is an archive with\n" \
             "    files and metadata.\n\n1.2.\u00a0Is this a question\nthat wraps?\n\n    Yes.\n\n" \
             "1.3.\u00a0Not a question\n\n    Text.\n\nChapter\u00a02.\u00a0更多\n\n2.1.\u00a0这是什么？\n\n" \
             "    这是一个\n    测试。\n"


def test_parse_rst_faq():
    qa = parse_rst_faq(RST)
    assert [q for _, q, _ in qa] == ["Why is the sky blue?", "How do I boil an egg?"]
    sec, _, a = qa[0]
    assert sec == "General" and "optics" in a and "`rayleigh()`" in a and "optics-label" not in a
    assert "note::" not in a and "its body stays" in a
    assert qa[1][2] == "Put it in boiling water for seven minutes."  # hard wraps joined


def test_parse_debian_faq():
    qa = parse_debian_faq(DEBIAN_TXT)
    assert [(s, q) for s, q, _ in qa] == [("Basics", "What is a package?"), ("Basics", "Is this a question that wraps?"),
                                          ("更多", "这是什么？")]
    assert qa[0][2] == "A package is an archive with files and metadata."
    assert qa[2][2] == "这是一个测试。"  # Chinese lines join without a space


def test_unwrap_keeps_code_and_lists():
    text = "one\ntwo\n\n    code line\n    more code\n\n* item\n* item2"
    assert unwrap(text) == "one two\n\n    code line\n    more code\n\n* item\n* item2"


@pytest.fixture(scope="module")
def sft_prepared(prepared, data_cfg):
    """SFT preparation on the same workdir: corpus and tokenizer come from the cache, conversations are new."""
    from data_pipeline.prepare import prepare_data

    cfg = data_cfg.replace(task="sft", seq_len=128, sft=data_cfg.sft.__class__(max_per_source=150))
    return prepare_data(prepared.workdir, cfg, progress=False), cfg


def test_sft_sources_and_unavailable_reported(sft_prepared):
    p, cfg = sft_prepared
    s = p.summary["sft"]
    assert s["sources"]["wiki_qa_en"]["conversations"] == 150 and s["sources"]["pydoc_qa_en"]["conversations"] > 10
    # download=False and an empty cache: the FAQ sources (Debian) are reported, not fatal
    assert set(s["unavailable"]) == {"python_faq_en", "debian_faq_en", "debian_faq_zh"}
    convs = [json.loads(line) for line in open(p.workdir / "sft" / "conversations.jsonl", encoding="utf-8")]
    c = convs[0]
    assert c["messages"][0]["role"] == "system" and c["messages"][1]["role"] == "user"
    assert [m["role"] for m in c["messages"][1:]] == ["user", "assistant"] * ((len(c["messages"]) - 1) // 2)
    assert max(len(c["messages"]) for c in convs) == 1 + 2 * cfg.sft.max_turns  # multi-turn


def test_sft_batches_mask_assistant_tokens_only(sft_prepared, tokenizer):
    p, cfg = sft_prepared
    convs = [json.loads(line) for line in open(p.workdir / "sft" / "conversations.jsonl", encoding="utf-8")]
    want = collections.Counter()
    for c in convs:
        if c["split"] != "train":
            continue
        ids, mask = tokenizer.encode_chat(c["messages"])
        for i in range(0, len(ids), cfg.seq_len):
            want[(tuple(ids[i:i + cfg.seq_len]), tuple(mask[i:i + cfg.seq_len]))] += 1
    batches = take_all(make_train_iterator(p, cfg, process_index=0, process_count=1, num_epochs=1))
    got = collections.Counter((tuple(int(x) for x in t), tuple(int(x) for x in m))
                              for b in batches for t, m in unpack_rows(b))
    assert got == want
    b = batches[0]
    assert 0 < b["loss_mask"].sum() < (b["segment_ids"] > 0).sum()  # only part of the tokens are targets
    targets = b["input_ids"][b["loss_mask"] == 1]
    assert tokenizer.im_start_id not in targets and tokenizer.bos_id not in targets
    assert tokenizer.im_end_id in targets


def test_sft_records_hold_masks(sft_prepared):
    p, _ = sft_prepared
    recs = [records.decode_record(r) for v in p.shards("train").values() for r in records.read_shards(v)]
    assert recs and all(len(r["mask"]) == len(r["tokens"]) and set(r["mask"].tolist()) <= {0, 1} for r in recs)


def test_real_faqs_when_debian_packages_are_available(tmp_path, tokenizer, data_cfg):
    """With apt: the Python FAQ and the Debian FAQ (en, zh) are parsed from the fetched packages; without it, each
    is reported unavailable with the reason."""
    from data_pipeline.sft import build_sft

    cfg = data_cfg.replace(download=True, cache_dir=str(tmp_path / "cache"), sft=data_cfg.sft.__class__(
        sources=("python_faq_en", "debian_faq_en", "debian_faq_zh"), max_per_source=40))
    try:
        s = build_sft(tmp_path / "sft", cfg, tokenizer)
    except ValueError as e:  # nothing could be fetched: the FAQ parsers were not exercised
        assert "unavailable" in str(e)
        pytest.skip(f"no Debian FAQ package could be fetched: {e}")
    for name in ("python_faq_en", "debian_faq_en", "debian_faq_zh"):
        if name in s["sources"]:
            assert s["sources"][name]["conversations"] == 40
            assert 0.5 < s["sources"][name]["target_tokens"] / s["sources"][name]["tokens"] < 1
        else:
            assert name in s["unavailable"]
