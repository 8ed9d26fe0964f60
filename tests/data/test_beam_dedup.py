"""Near-duplicate removal: planted near duplicates (a few words changed; a paragraph moved) and an exact copy
(differing only in case and whitespace) are dropped, distinct documents kept; the Jaccard threshold is a config
field and the test shows both sides of it."""

from __future__ import annotations

import json
import re

import pytest

from tests.data.beam_helpers import beam_drops, beam_records, run_beam


def _jaccard(a: str, b: str, n: int = 5) -> float:
    """Exact Jaccard of word 5-gram sets (the test's own, independent of datasketch and the normaliser)."""
    def grams(t):
        w = re.findall(r"\w+", t.lower())
        return {tuple(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}
    sa, sb = grams(a), grams(b)
    return len(sa & sb) / len(sa | sb)


def _change_words(text: str, k: int) -> str:
    """Replace every k-th word of the first part by another word."""
    words = text.split(" ")
    for i in range(10, len(words), k):
        words[i] = "zebra"
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(prepared, tmp_path_factory):
    """(input file, {id: text}): distinct English wiki documents plus the planted duplicates."""
    rows = [json.loads(line) for line in open(prepared.workdir / "corpus" / "jsonl" / "wiki_en.jsonl", encoding="utf-8")]
    rows = [r for r in rows if 700 < len(r["text"]) < 1200][:23]
    docs = {f"d{i:02d}": r["text"] for i, r in enumerate(rows[:20])}
    paras = [rows[20]["text"], rows[21]["text"], rows[22]["text"]]
    docs["multi"] = "\n\n".join(paras)
    docs["zz_reordered"] = "\n\n".join([paras[1], paras[0], paras[2]])  # one paragraph moved
    docs["zz_words"] = _change_words(docs["d03"], 40)                    # a few words changed (~3 %)
    docs["zz_exact"] = "  " + docs["d05"].upper().replace(" ", "   ") + "\n"  # case and whitespace only
    path = tmp_path_factory.mktemp("planted") / "planted.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in docs.items()), encoding="utf-8")
    return path, docs


def _kept_and_dropped(prepared, path, out, jaccard):
    run_beam(prepared, [path], out, threshold=0.0, dedup={"jaccard": jaccard})
    return set(beam_records(out)), {d["id"]: d["reason"] for d in beam_drops(out)}


def test_planted_duplicates_removed_distinct_kept(prepared, planted, tmp_path):
    path, docs = planted
    j_words, j_reorder = _jaccard(docs["zz_words"], docs["d03"]), _jaccard(docs["zz_reordered"], docs["multi"])
    assert 0.6 < j_words < 0.85 and j_reorder > 0.9, (j_words, j_reorder)  # the planted similarities
    distinct = max(_jaccard(docs[a], docs[b]) for a in docs for b in docs if a < b and not (
        {a, b} & {"zz_words", "zz_reordered", "zz_exact"}))
    assert distinct < 0.2
    kept, dropped = _kept_and_dropped(prepared, path, tmp_path / "low", jaccard=0.5)
    assert dropped == {"zz_words": "duplicate_near", "zz_reordered": "duplicate_near", "zz_exact": "duplicate_exact"}
    assert kept == set(docs) - set(dropped)  # every distinct document (and each original) is kept


def test_threshold_above_the_similarity_keeps_the_near_duplicate(prepared, planted, tmp_path):
    path, docs = planted
    j_words = _jaccard(docs["zz_words"], docs["d03"])
    kept, dropped = _kept_and_dropped(prepared, path, tmp_path / "high", jaccard=0.9)
    assert j_words < 0.9 - 0.1 < 0.9 + 0.03 < _jaccard(docs["zz_reordered"], docs["multi"])  # both sides, with margin
    assert "zz_words" in kept and dropped.get("zz_reordered") == "duplicate_near"
    assert dropped.get("zz_exact") == "duplicate_exact" and "zz_words" not in dropped


def test_bad_dedup_config_names_the_field():
    from data_pipeline.beam.config import DedupConfig

    with pytest.raises(ValueError, match=r"process\.dedup\.jaccard"):
        DedupConfig(jaccard=1.5)
    with pytest.raises(ValueError, match=r"process\.dedup\.bands"):
        DedupConfig(num_perm=64, bands=100)
