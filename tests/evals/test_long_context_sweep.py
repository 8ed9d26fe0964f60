"""The shipped long-context sweep: it parses, its three arms (dense, InfLLM v2 minicpm4, minicpm4.1) differ only in
attention, and they train on the needle records and the corpus at 2048 tokens, one document per row."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from minicpm_jax.config import ModelConfig
from minicpm_jax.train.config import load_config
from minicpm_jax.train.sweep import expand, load_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "experiments" / "sweeps" / "long_context.yaml"


def _flat(x, prefix=""):
    """A dataclass tree as {"a.b.c": leaf}."""
    if dataclasses.is_dataclass(x):
        out = {}
        for f in dataclasses.fields(x):
            out.update(_flat(getattr(x, f.name), f"{prefix}{f.name}."))
        return out
    return {prefix[:-1]: x}


@pytest.fixture(scope="module")
def arms():
    spec = load_sweep(SWEEP)
    return {p["values"]["point"]: load_config(spec["base"], p["overrides"]) for p in expand(spec)}


def test_three_arms_differ_only_in_attention(arms):
    assert list(arms) == ["dense", "sparse_minicpm4", "sparse_minicpm4.1"]
    flat = {k: _flat(v) for k, v in arms.items()}
    keys = set(flat["dense"])
    differ = {k for k in keys if len({repr(f[k]) for f in flat.values()}) > 1}
    assert differ == {"name", "output_dir", "model.attention", "model.sparse_config"}, differ
    assert [a.model.attention for a in arms.values()] == ["dense", "sparse", "sparse"]
    assert [a.model.sparse_config for a in arms.values()] == [None, {"variant": "minicpm4"}, {"variant": "minicpm4.1"}]
    # the built model configs: the same but for the InfLLM v2 variant (and lse_approx, whose default follows it)
    sc = {k: dataclasses.asdict(a.model_config().sparse_config) for k, a in arms.items()}
    assert sc["sparse_minicpm4"]["variant"] == "minicpm4" and sc["sparse_minicpm4.1"]["variant"] == "minicpm4.1"
    same = lambda d: {k: v for k, v in d.items() if k not in ("variant", "lse_approx")}   # noqa: E731
    assert same(sc["sparse_minicpm4"]) == same(sc["sparse_minicpm4.1"]) == same(sc["dense"])
    cfgs = [dataclasses.replace(a.model_config(), sparse_config=None) for a in arms.values()]
    assert cfgs[0] == cfgs[1] == cfgs[2]


def test_same_data_and_a_long_enough_window(arms):
    a = arms["dense"]
    assert a.data.seq_len == 2048 and not a.data.pack               # InfLLM v2 takes one document per row
    assert a.model.max_position_embeddings >= 8192                  # the eval probes 8K
    assert a.model_config().rope_scaling is None                    # plain RoPE: positions past 2048 extrapolate
    names = {m.name: m for m in a.data.mixture}
    assert set(names) == {"corpus", "needles"}
    assert any("needle-train" in s for s in names["needles"].sources) and names["needles"].min_score == 0.0
    assert a.train.init_from == "runs/retrieval_mid_tiny"        # stage 2b of the curriculum, for every arm


def test_points_need_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: tiny\npoints:\n  a: [model.attention]\n")
    with pytest.raises(ValueError, match="points"):
        load_sweep(bad)
    both = tmp_path / "both.yaml"
    both.write_text("base: tiny\ngrid: {train.steps: [1]}\npoints:\n  a: [train.steps=1]\n")
    with pytest.raises(ValueError, match="either"):
        load_sweep(both)


def test_curriculum_stages_chain(arms):
    """Stage 1 (copy task) -> 1b (copies across a gap, rope_theta raised) -> 1c (copies from far back) -> 1d
    (copies inside prose, digit spans) -> stage 2 (short needles) -> 2b (needles to 1K) -> stage 3 (every arm):
    each starts from the one before, all dense until stage 3, stage 1b overrides only rope_theta (the later stages
    inherit it), 1c-2b carry the Adam moments on (stage 3 too), and stages 2 and 2b keep the prose and digit copies
    in their mixtures."""
    warm, gap, far, prose, short, mid = (load_config(n, []) for n in (
        "retrieval_warmup_tiny", "retrieval_gap_tiny", "retrieval_far_tiny", "retrieval_prose_tiny",
        "retrieval_short_tiny", "retrieval_mid_tiny"))
    assert warm.train.init_from == "runs/tiny"
    assert gap.train.init_from == "runs/" + warm.name and gap.train.init_from_override == ("rope_theta",)
    assert gap.model.rope_theta == 1e6 > ModelConfig.tiny().rope_theta and warm.model.rope_theta is None
    assert far.train.init_from == "runs/" + gap.name and prose.train.init_from == "runs/" + far.name
    assert short.train.init_from == "runs/" + prose.name and mid.train.init_from == "runs/" + short.name
    assert (short.data.seq_len, mid.data.seq_len) == (512, 1024)
    for cfg in (far, prose, short, mid):
        assert cfg.train.init_from_optimizer and cfg.train.init_from_override == ()
        assert cfg.model.rope_theta is None                       # 1e6 comes from stage 1b's run
    assert far.optim.decay_steps == prose.optim.decay_steps == 0  # the next stage continues at the peak lr
    assert {a.train.init_from for a in arms.values()} == {"runs/" + mid.name}
    assert {c.model.attention for c in (warm, gap, far, prose, short, mid)} == {"dense"}
    for cfg, names in ((warm, {"corpus", "copies"}), (gap, {"corpus", "near", "mid", "far"}),
                       (far, {"corpus", "near", "far"}), (prose, {"corpus", "far", "prose", "digits"}),
                       (short, {"corpus", "digits", "prose", "needles"}),
                       (mid, {"corpus", "digits", "prose", "needles", "needles_mid"})):
        assert {m.name for m in cfg.data.mixture} == names
        assert all(m.min_score == 0.0 for m in cfg.data.mixture if m.name != "corpus")
    for cfg in (short, mid):
        sources = {m.name: m.sources for m in cfg.data.mixture}
        assert all("copy-digits" in s for s in sources["digits"]) and all("copy-prose" in s for s in sources["prose"])
    assert all("needle-mid" in s for m in mid.data.mixture if m.name == "needles_mid" for s in m.sources)
    assert all(a.train.init_from_optimizer for a in arms.values())     # stage 3 carries stage 2's moments on
