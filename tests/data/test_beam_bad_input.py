"""Bad input never stops the Beam pipeline: an unreadable file, a pattern matching nothing, lines that are not
JSON or not UTF-8, empty documents, a 50 MB single line, a Parquet row without text each land in the report under
their reason (and in drops-*.jsonl with file and line), and every good document still arrives."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq

from tests.data.beam_helpers import beam_drops, beam_records, run_beam

GOOD = "The river runs through the old town and past the market square, where traders sell bread. "


def test_each_bad_input_is_reported_under_its_reason(prepared, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    lines = [json.dumps({"id": "j1", "text": GOOD * 3}).encode(),
             b'{"id": "bad", "text": "unterminated',                                     # 2 bad_json
             '{"id": "lat", "text": "caf\u00e9"}'.encode("latin-1"),                     # 3 bad_encoding
             json.dumps({"id": "e", "text": "   \n "}).encode(),                           # 4 empty
             b'{"id": "huge", "text": "' + b"z" * (50 << 20) + b'"}',                       # 5 huge (50 MB line)
             json.dumps({"id": "j2", "text": "Second good document about mountains. " * 4}).encode(),
             b"[1, 2]",                                                                     # 7 not_an_object
             json.dumps({"id": "nt", "title": "no text"}).encode()]                         # 8 missing_field
    (src / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (src / "broken.jsonl.gz").write_bytes(b"this is not gzip data at all")                 # read_error
    (src / "note.txt").write_text("A plain text note about the harbour and its lighthouse. " * 3)
    (src / "latin1.txt").write_bytes("d\u00e9j\u00e0 vu".encode("latin-1"))              # bad_encoding
    (src / "blank.txt").write_text("\n\n  \n")                                             # empty
    pq.write_table(pa.table({"id": ["p1", "p2"], "text": ["Parquet row about desert plants and cacti. " * 3, None]}),
                   src / "rows.parquet")                                                    # row 2: bad_field_type
    missing = str(tmp_path / "nowhere" / "*.jsonl")                                         # read_error (no match)
    report = run_beam(prepared, [str(src / "*"), missing], tmp_path / "out", threshold=0.0)

    expected = {"bad_json": 1, "bad_encoding": 2, "empty": 2, "huge": 1, "not_an_object": 1, "missing_field": 1,
                "read_error": 2, "bad_field_type": 1}
    assert report["dropped_by_reason"] == expected
    drops = beam_drops(tmp_path / "out")
    where = {(d["file"].rsplit("/", 1)[-1], d["line"], d["reason"]) for d in drops}
    assert {("mixed.jsonl", 2, "bad_json"), ("mixed.jsonl", 3, "bad_encoding"), ("mixed.jsonl", 4, "empty"),
            ("mixed.jsonl", 5, "huge"), ("mixed.jsonl", 7, "not_an_object"), ("mixed.jsonl", 8, "missing_field"),
            ("broken.jsonl.gz", None, "read_error"), ("*.jsonl", None, "read_error"),
            ("latin1.txt", 1, "bad_encoding"), ("blank.txt", None, "empty"),
            ("rows.parquet", 2, "bad_field_type")} == where
    kept = beam_records(tmp_path / "out")
    assert set(kept) == {"j1", "j2", "p1", "user_note:0"}  # nothing else is lost
    assert report["kept"] == 4 and report["dropped"] == sum(expected.values())
    assert report["per_source"]["user_mixed"]["dropped"]["huge"] == 1
    assert report["bytes_processed"] > 50 << 20 and report["documents_per_s"] > 0


def test_bad_process_config_names_the_field(prepared, tmp_path):
    import pytest

    from data_pipeline.beam.config import ProcessConfig

    with pytest.raises(ValueError, match=r"process\.threshold"):
        ProcessConfig(inputs=("x",), out="o", classifier="c", tokenizer="t", threshold=2.0)
    with pytest.raises(ValueError, match=r"process\.inputs"):
        ProcessConfig(inputs=(), out="o", classifier="c", tokenizer="t")
    with pytest.raises(ValueError, match=r"process\.classifier: cannot read .*nope/classifier\.json"):
        run_beam(prepared, [str(tmp_path / "x.jsonl")], tmp_path / "o2", classifier=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"process\.tokenizer: .*holds no tokenizer"):
        run_beam(prepared, [str(tmp_path / "x.jsonl")], tmp_path / "o2", tokenizer=str(tmp_path / "nope"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="is not empty"):
        run_beam(prepared, [str(tmp_path / "x.jsonl")], tmp_path / "out")
