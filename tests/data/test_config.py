"""DataConfig: defaults, YAML + overrides through OmegaConf, errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline.config import DataConfig, MixtureComponent

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_round_trip():
    cfg = DataConfig()
    assert cfg.task == "pretrain" and cfg.sources == ("auto",) and cfg.classifier.threshold == 0.5
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_section_and_overrides(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text("model: {preset: tiny}\ndata:\n  seq_len: 128\n  classifier: {dim: 8}\n  mixture:\n"
                 "    - {name: a, weight: 0.3, sources: [wiki_en], min_score: 0.5}\n    - {name: b, weight: 0.7}\n")
    cfg = DataConfig.from_yaml(p, ["batch_size=3", "classifier.rounds=4", "sources=[pip,debian]"])
    assert (cfg.seq_len, cfg.batch_size, cfg.classifier.dim, cfg.classifier.rounds) == (128, 3, 8, 4)
    assert cfg.sources == ("pip", "debian")
    assert cfg.mixture == (MixtureComponent("a", 0.3, ("wiki_en",), 0.5), MixtureComponent("b", 0.7))


@pytest.mark.parametrize("bad, field", [
    ({"seq_lenn": 5}, "seq_lenn"),
    ({"seq_len": "long"}, "seq_len"),
    ({"seq_len": 4}, "data.seq_len"),
    ({"vocab_size": 100}, "data.vocab_size"),
    ({"task": "rlhf"}, "data.task"),
    ({"classifier": {"threshold": 1.5}}, "data.classifier.threshold"),
    ({"classifier": {"confident_pos": 0.4}}, "data.classifier.confident_pos"),
    ({"classifier": {"tokenization": "bpe"}}, "data.classifier.tokenization"),
    ({"tokenizer": {"character_coverage": 0.5}}, "data.tokenizer.character_coverage"),
    ({"mixture": [{"name": "a", "weight": 0}]}, "data.mixture[a].weight"),
    ({"mixture": [{"name": "a", "weight": 1, "min_score": 2}]}, "data.mixture[a].min_score"),
    ({"mixture": [{"name": "a", "weight": 1}, {"name": "a", "weight": 1}]}, "data.mixture"),
    ({"mixture": [{"name": "a", "weight": 1, "typo": 1}]}, "data.mixture[0]"),
    ({"min_doc_chars": 5000}, "data.min_doc_chars"),
])
def test_errors_name_the_field(bad, field):
    with pytest.raises(Exception) as e:
        DataConfig.from_dict(bad)
    assert field in str(e.value)


def test_experiment_configs_load():
    for f in sorted((REPO / "experiments/configs/data").glob("*.yaml")):
        DataConfig.from_yaml(f)
    cand = DataConfig.from_yaml(REPO / "experiments/configs/data/ev_anneal_candidate.yaml")
    assert [(c.name, c.weight, c.min_score) for c in cand.mixture] == [("candidate", 0.3, 0.5),
                                                                       ("default", 0.7, 0.0)]
