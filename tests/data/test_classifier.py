"""UltraClean classifier: held-out-by-source quality, the iterative loop, metrics, preprocessing, scoring paths."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest

from data_pipeline import classifier as K
from data_pipeline.normalize import Preprocessor, clean
from tests.data.conftest import take_all

# Stated minimum: ROC AUC on sources held out whole (python_reference_en vs package_code + package_metadata) on
# the ~1.5 MB pip-only sample. Measured over 8 sample seeds (0-7): 0.56-0.83 (mean 0.72; seed 0, tested here: 0.73),
# with apache-beam and its dependencies installed 0.58-0.77 (mean 0.71; seed 0: 0.69); 0.96 on the 17 MB pip-only
# default corpus and 0.87 with the Debian sources. Chance is 0.50 +- 0.05 here; a random split scores ~0.99.
HELDOUT_AUC_MIN = 0.65


@pytest.fixture(scope="module")
def rounds(prepared):
    return json.loads((prepared.classifier_dir / "rounds.json").read_text())


def test_heldout_sources_auc_above_stated_minimum(rounds):
    held, trained = set(rounds["heldout_sources"]), set(rounds["train_sources"])
    assert held == {"python_reference_en", "package_code", "package_metadata"} and not held & trained
    final = rounds["rounds"][-1]["heldout"]
    assert final["n_pos"] > 30 and final["n_neg"] > 30
    assert final["auc"] >= HELDOUT_AUC_MIN, rounds["rounds"]
    by = rounds["rounds"][-1]["heldout_by_source"]
    assert by["python_reference_en"]["mean_score"] > by["package_code"]["mean_score"] + 0.2  # >= 0.36 measured (seed 0)


def test_iterative_rounds_promote_confident_pool_documents(rounds):
    r0, r1 = rounds["rounds"][:2]
    assert "promoted_pos" not in r0
    assert r1["promoted_pos"] > 0 and r1["promoted_neg"] > 0
    # confident predictions on the pool mostly agree with the label their source implies
    assert r1["promoted_agree_with_source_label"] >= 0.9  # 0.97-1.0 measured
    assert r1["train_pos"] >= r0["train_pos"]
    assert r0["epochs"] >= 6  # the small sample got extra epochs (min_updates)


def test_training_is_deterministic(prepared, data_cfg, tmp_path):
    cfg = data_cfg.replace(classifier=dataclasses.replace(data_cfg.classifier, rounds=1))
    lines = K.preprocess_corpus(prepared.workdir / "corpus", "spm", str(prepared.tokenizer_dir))
    a = K.train_classifier(prepared.workdir / "corpus", tmp_path / "a", cfg, str(prepared.tokenizer_dir), lines)
    b = K.train_classifier(prepared.workdir / "corpus", tmp_path / "b", cfg, str(prepared.tokenizer_dir), lines)
    assert a["rounds"][0]["heldout"] == b["rounds"][0]["heldout"]
    assert (tmp_path / "a" / "model.bin").read_bytes() == (tmp_path / "b" / "model.bin").read_bytes()


def test_quantized_model_is_small_and_close(prepared, data_cfg, tmp_path):
    cfg = data_cfg.replace(classifier=dataclasses.replace(data_cfg.classifier, rounds=1, quantize=True, bucket=8192))
    rep = K.train_classifier(prepared.workdir / "corpus", tmp_path / "q", cfg, str(prepared.tokenizer_dir))
    assert (tmp_path / "q" / "model.ftz").exists() and not (tmp_path / "q" / "model.bin").exists()
    assert rep["final"]["model_bytes"] < 2_000_000
    assert abs(rep["final"]["heldout"]["auc"] - rep["rounds"][0]["heldout"]["auc"]) < 0.1
    clf = K.QualityClassifier.load(tmp_path / "q")
    s = clf.score(["A well written paragraph about the history of Rome.", "def f(x):\n    return x\n"])
    assert s.shape == (2,) and ((0 <= s) & (s <= 1)).all()


def test_roc_auc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60) / 4.0  # many ties
    labels = rng.random(60) < 0.4
    pairs = [(p, n) for p, n in itertools.product(scores[labels], scores[~labels])]
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])
    assert K.roc_auc(scores, labels) == pytest.approx(brute)
    assert K.roc_auc(scores, np.ones(60, bool)) is None


def test_binary_metrics_at_threshold():
    m = K.binary_metrics(np.array([0.9, 0.8, 0.3, 0.6, 0.1]), np.array([1, 1, 1, 0, 0], bool), 0.5)
    assert (m["precision"], m["recall"], m["auc"]) == (round(2 / 3, 4), round(2 / 3, 4), round(5 / 6, 4))


def test_preprocessing_follows_ultraclean(tokenizer):
    assert clean("Crème  Brûlée\n\n\n\n\tÉTÉ") == "creme brulee\n\n\tete"
    pieces = [p for p, _, _ in tokenizer.pieces()]
    pre = Preprocessor("spm", pieces, tokenizer.encode_batch)
    out = pre("Héllo\tWorld\n\n\n\n中文\r\nx")
    assert "\n" not in out and "\t" not in out  # one fastText line
    toks = out.split(" ")
    assert toks.count("\\n") == 3 and "\\t" in toks and "\\r" in toks  # newline, tab, CR kept as tokens
    assert out == out.lower() and "é" not in out
    assert Preprocessor("simple")("Über 中文!\nok") == "uber 中 文 ! \\n ok"


def test_stored_scores_equal_classifier_scores(prepared, corpus_dir, token_docs):
    from data_pipeline.corpus import iter_docs

    clf = prepared.classifier()
    by_id = {d["id"]: d["text"] for d in iter_docs(corpus_dir)}
    sample = token_docs[::25]
    fresh = clf.score([by_id[d["id"]] for d in sample])
    np.testing.assert_allclose(fresh, [d["score"] for d in sample], atol=1e-4)


def test_pipeline_scores_and_tokenizes_raw_text_like_the_offline_pass(prepared, data_cfg, token_docs):
    """Full path (text shards -> score -> filter -> tokenize -> pack) keeps the same documents with the same tokens
    as the prepared path (token shards with stored scores -> filter -> pack)."""
    from data_pipeline.pipeline import make_train_iterator
    from tests.data.test_packing import expected_pieces, stream_pieces

    man = json.loads((prepared.workdir / "corpus" / "manifest.json").read_text())
    src = "python_docstrings_en"
    paths = [str(prepared.workdir / "corpus" / p) for p in man["sources"][src]["shards"]]
    cfg = data_cfg.replace(tokenizer=dataclasses.replace(data_cfg.tokenizer, path=str(prepared.tokenizer_dir)))
    batches = take_all(make_train_iterator({src: paths}, cfg, process_index=0, process_count=1, num_epochs=1,
                                           classifier=prepared.classifier_dir))
    kept = [d for d in token_docs if d["source"] == src and d["score"] >= cfg.classifier.threshold]
    assert 10 < len(kept) < len([d for d in token_docs if d["source"] == src])
    assert stream_pieces(batches) == expected_pieces(kept, cfg.seq_len)
