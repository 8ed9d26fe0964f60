"""Weighted mixtures in grain: token shares follow the weights; the efficient-verification arms."""

from __future__ import annotations

from pathlib import Path

from data_pipeline.config import DataConfig, MixtureComponent
from data_pipeline.packing import unpack_rows
from data_pipeline.pipeline import make_train_iterator

REPO = Path(__file__).resolve().parents[2]


def piece_owner(token_docs, seq_len):
    """piece tokens -> (source, score) of the document it comes from; None for pieces several documents share
    (a final piece that is only EOS, say)."""
    owner: dict = {}
    for d in token_docs:
        t = d["tokens"]
        for i in range(0, len(t), seq_len):
            key = tuple(int(x) for x in t[i:i + seq_len])
            owner[key] = None if key in owner and owner[key] != (d["source"], d["score"]) else (d["source"],
                                                                                              d["score"])
    return owner


def token_shares(prepared, cfg, token_docs, n_batches=150):
    owner = piece_owner(token_docs, cfg.seq_len)
    it = make_train_iterator(prepared, cfg, process_index=0, process_count=1)
    counts: dict = {}
    for _ in range(n_batches):
        for p, _ in unpack_rows(next(it)):
            key = owner[tuple(int(x) for x in p)]
            if key is not None:
                counts[key] = counts.get(key, 0) + len(p)
    it.close()
    return counts


def test_token_shares_follow_weights(prepared, data_cfg, token_docs):
    cfg = data_cfg.replace(mixture=(MixtureComponent("en", 0.25, ("wiki_en",), 0.0),
                                    MixtureComponent("zh", 0.75, ("peoples_daily_zh",), 0.0)))
    counts = token_shares(prepared, cfg, token_docs)
    by_src: dict = {}
    for (src, _), n in counts.items():
        by_src[src] = by_src.get(src, 0) + n
    assert set(by_src) == {"wiki_en", "peoples_daily_zh"}
    share = by_src["wiki_en"] / sum(by_src.values())
    assert abs(share - 0.25) < 0.04, share


def test_efficient_verification_candidate_arm(prepared, data_cfg, token_docs):
    """Arm (b): 30 % of tokens from documents the classifier keeps (score >= 0.5), 70 % from the unfiltered mix."""
    arm = DataConfig.from_yaml(REPO / "experiments/configs/data/ev_anneal_candidate.yaml")
    cfg = data_cfg.replace(mixture=arm.mixture)
    counts = token_shares(prepared, cfg, token_docs)
    total = sum(counts.values())
    low = sum(n for (_, s), n in counts.items() if s < 0.5) / total
    # unfiltered data has this share of low-score tokens; the mixture dilutes it by the 70 % weight
    all_tokens = sum(len(d["tokens"]) for d in token_docs)
    base_low = sum(len(d["tokens"]) for d in token_docs if d["score"] < 0.5) / all_tokens
    assert abs(low - 0.7 * base_low) < 0.06, (low, base_low)
    default = DataConfig.from_yaml(REPO / "experiments/configs/data/ev_anneal_default.yaml")
    # 400 batches (~100k tokens): a document gives many consecutive pieces, so 100 batches hold only a few dozen
    # documents and their low-score share strayed from base_low by up to 0.17 with an unchanged corpus size (seed 0,
    # another set of installed packages); 400 batches came within 0.02 of it in both environments
    counts_a = token_shares(prepared, data_cfg.replace(mixture=default.mixture), token_docs, n_batches=400)
    low_a = sum(n for (_, s), n in counts_a.items() if s < 0.5) / sum(counts_a.values())
    assert abs(low_a - base_low) < 0.08 and low < low_a


def test_a_filter_that_keeps_nothing_fails_instead_of_hanging(prepared, data_cfg):
    import pytest

    cfg = data_cfg.replace(mixture=(MixtureComponent("raw", 1.0, ("reviews_zh",), 1.0),))
    it = make_train_iterator(prepared, cfg, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="skipped 100.00 %"):
        next(it)
    it.close()
