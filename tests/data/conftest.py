"""Session fixtures for the data-pipeline tests: one small real corpus sample (pip-installed sources only, ~1.3 MB),
prepared once per session (corpus, tokenizer, classifier, token shards) in a few seconds."""

from __future__ import annotations

import pytest

# Pip-only sources, capped: every source contributes at most 150 documents / 0.15 MB.
SAMPLE = {"sources": ["pip"], "max_docs_per_source": 150, "max_mb_per_source": 0.15, "vocab_size": 2048,
          "seq_len": 64, "batch_size": 4, "num_packing_bins": 8, "download": False,
          "tokenizer": {"max_train_mb": 1.0}}


@pytest.fixture(scope="session")
def data_cfg(tmp_path_factory):
    from data_pipeline.config import DataConfig

    return DataConfig.from_dict({**SAMPLE, "cache_dir": str(tmp_path_factory.mktemp("debcache"))})


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, data_cfg):
    from data_pipeline.prepare import prepare_data

    return prepare_data(tmp_path_factory.mktemp("prepared"), data_cfg, progress=False)


@pytest.fixture(scope="session")
def corpus_dir(prepared):
    return prepared.workdir / "corpus"


@pytest.fixture(scope="session")
def tokenizer(prepared):
    return prepared.tokenizer


@pytest.fixture(scope="session")
def token_docs(prepared):
    """Every tokenized training document of the sample: list of dicts with tokens, score, source."""
    from data_pipeline import records

    out = []
    for name, paths in prepared.shards("train").items():
        for raw in records.read_shards(paths):
            out.append(records.decode_record(raw))
    return out


def take_all(it, limit: int = 100_000) -> list[dict]:
    """Every batch of a finite iterator (and close it: grain's prefetch threads otherwise outlive the test)."""
    out = []
    for b in it:
        out.append(b)
        if len(out) >= limit:
            break
    if hasattr(it, "close"):
        it.close()
    return out
