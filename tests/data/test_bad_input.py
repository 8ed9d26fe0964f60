"""Bad input is counted per file and line, skipped, summarised, and never crashes a run."""

from __future__ import annotations

import json

import numpy as np

from data_pipeline import corpus as C
from data_pipeline import records
from data_pipeline.report import DropReport
from tests.data.conftest import take_all

GOOD = "A good document. " * 10


def write_bad_jsonl(path, huge_bytes: int) -> dict[int, str]:
    """A JSONL file mixing good lines with every kind of bad one; returns line -> expected reason."""
    lines: list[bytes] = []
    expect: dict[int, str] = {}

    def add(raw: bytes, reason: str | None = None):
        lines.append(raw)
        if reason:
            expect[len(lines)] = reason

    add(json.dumps({"text": GOOD, "lang": "en"}).encode())
    add(b'{"text": "unterminated', "bad_json")
    add('{"text": "caf\u00e9 in latin-1"}'.encode("latin-1"), "bad_encoding")
    add(json.dumps({"text": "\ud800 lone surrogate"}).encode(), "bad_encoding")
    add(b'["a", "list"]', "not_an_object")
    add(json.dumps({"title": "no text field"}).encode(), "missing_field")
    add(json.dumps({"text": 42}).encode(), "bad_field_type")
    add(json.dumps({"text": "  \n\t "}).encode(), "empty")
    add(json.dumps({"text": "z" * huge_bytes}).encode(), "huge")
    add(b"")  # blank line: formatting, not a document
    add(json.dumps({"text": "中文文档。" * 30, "label": "hq"}).encode())
    add(b"\xff\xfe\x00garbage bytes", "bad_encoding")
    path.write_bytes(b"\n".join(lines) + b"\n")
    return expect


def test_jsonl_reader_reports_each_bad_line(tmp_path):
    p = tmp_path / "docs.jsonl"
    expect = write_bad_jsonl(p, huge_bytes=2000)
    report = DropReport()
    good = list(C.iter_jsonl_docs(p, report, max_bytes=1000))
    assert [n for n, _ in good] == [1, 11]
    assert {(k["line"], k["reason"]) for k in report.kept} == set(expect.items())
    assert all(k["file"] == str(p) for k in report.kept)
    s = report.summary()
    assert s["dropped"] == len(expect) and s["by_reason"]["bad_encoding"] == 3
    assert s["by_file"][str(p)]["bad_json"] == 1
    text = report.format()
    assert f"dropped {len(expect)} item(s)" in text and "bad_json" in text and str(p) in text


def test_build_with_bad_user_input_keeps_going_and_reports(tmp_path, data_cfg):
    p = tmp_path / "mine.jsonl"
    expect = write_bad_jsonl(p, huge_bytes=2_100_000)
    cfg = data_cfg.replace(sources=("wiki_en",), max_docs_per_source=10, inputs=(str(p),), max_input_doc_mb=2.0)
    man = C.build_corpus(tmp_path / "c", cfg)
    user = man["sources"]["user_mine"]
    assert user["docs"] == 2 and user["tier"] == "user"
    assert sorted(user["lang"]) == ["en", "zh"]
    assert man["drops"]["dropped"] == len(expect)
    drops = [json.loads(line) for line in open(tmp_path / "c" / "drops.jsonl")]
    assert {(d["line"], d["reason"]) for d in drops} == set(expect.items())
    docs = list(C.iter_docs(tmp_path / "c", ["user_mine"]))
    assert docs[1]["label"] == "hq" and docs[0]["origin"].endswith(":1")


def test_unreadable_and_undecodable_files_are_reported(tmp_path):
    from data_pipeline.sources import read_lines, read_text_file

    report = DropReport()
    assert read_text_file(tmp_path / "missing.txt", report) is None
    bad = tmp_path / "gbk.txt"
    bad.write_bytes("第一行\n".encode() + "第二行是GBK编码".encode("gbk") + b"\n" + "第三行\n".encode())
    assert read_text_file(bad, report) is None
    assert list(read_lines(bad, report)) == ["第一行", "第三行"]  # line-wise reading keeps the good lines
    reasons = [(k["reason"], k["line"]) for k in report.kept]
    assert reasons == [("read_error", None), ("bad_encoding", 2), ("bad_encoding", 2)]


def test_corrupt_record_in_a_shard_is_skipped_by_the_pipeline(tmp_path, prepared, data_cfg, token_docs):
    """A long run meets a damaged record: it is logged and filtered out, the other documents all arrive."""
    from data_pipeline.pipeline import make_train_iterator
    from tests.data.test_packing import expected_pieces, stream_pieces

    docs = token_docs[:30]
    recs = [records.encode_token_record(d["tokens"], score=1.0, source="x") for d in docs]
    recs.insert(7, b"\x93not msgpack")
    recs.insert(15, b"{broken json")
    shards = records.write_shards(recs, tmp_path, "damaged")
    cfg = data_cfg.replace(filter_quality=False)
    batches = take_all(make_train_iterator([str(s) for s in shards], cfg, process_index=0, process_count=1,
                                           num_epochs=1))
    assert stream_pieces(batches) == expected_pieces(docs, cfg.seq_len)


def test_empty_documents_vanish_and_huge_ones_are_split(tmp_path, data_cfg):
    from data_pipeline.pipeline import make_train_iterator
    from tests.data.test_packing import stream_pieces

    L = data_cfg.seq_len
    huge = np.arange(1, 10 * L + 4, dtype=np.int32)
    recs = [records.encode_token_record(np.zeros(0, np.int32), score=1.0),
            records.encode_token_record(huge, score=1.0)]
    shards = records.write_shards(recs, tmp_path, "edge")
    batches = take_all(make_train_iterator([str(s) for s in shards], data_cfg.replace(filter_quality=False),
                                           process_index=0, process_count=1, num_epochs=1))
    pieces = stream_pieces(batches)
    assert sum(pieces.values()) == 11 and sum(len(p) * n for p, n in pieces.items()) == len(huge)


def test_atomic_writes_leave_no_partial_file(tmp_path):
    target = tmp_path / "out.jsonl"

    def rows():
        yield {"a": 1}
        raise RuntimeError("crash mid-write")

    try:
        records.write_jsonl(target, rows())
    except RuntimeError:
        pass
    assert not target.exists() and not list(tmp_path.iterdir())
