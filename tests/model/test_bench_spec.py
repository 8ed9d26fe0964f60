"""`minicpm bench spec` accounting: bytes a decode step must read and the draft head's output FLOPs, worked out by
hand; a tiny end-to-end run of the bench table on a random model of trivial size."""

import re

import jax
import pytest

import minicpm_jax as mc
from minicpm_jax.bench import spec

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, sparse_config=None)


def test_decode_bytes_by_hand():
    cfg = mc.ModelConfig.tiny(**SMALL)
    # per layer: q 32*32 + o 32*32 + k 32*16 + v 32*16 + gate/up/down 3*32*48 + 2 norms 2*32
    #            = 1024 + 1024 + 512 + 512 + 4608 + 64 = 7744
    # model: 2 layers 15488 + final norm 32 + tied embedding/head 96*32 = 3072 -> 18592 floats = 74368 bytes
    # cache: 2 layers * (K and V) * 10 tokens * 2 KV heads * head_dim 8 * 4 bytes = 2560 bytes
    got = spec.decode_bytes_per_step(cfg, kv_len=10)
    assert got == {"weights": 74368, "cache": 2560, "total": 76928}
    assert spec.decode_bytes_per_step(cfg, kv_len=10, batch=3)["cache"] == 3 * 2560
    untied = cfg.replace(tie_word_embeddings=False, dtype="bfloat16", param_dtype="bfloat16")
    # untied: the head reads lm_head (32*96, in place of the tied matrix) plus the one looked-up embedding row of
    # 32 (the rest of the embedding is never read); bf16 halves everything
    assert spec.decode_bytes_per_step(untied, kv_len=10) == {"weights": 2 * (18592 + 32), "cache": 1280,
                                                             "total": 2 * (18592 + 32) + 1280}
    with pytest.raises(ValueError, match="kv_len"):
        spec.decode_bytes_per_step(cfg, kv_len=-1)


def test_weight_bytes_match_the_parameters():
    cfg = mc.ModelConfig.tiny(**SMALL)
    params = mc.init_params(cfg, jax.random.key(0))
    n = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert spec.decode_bytes_per_step(cfg, kv_len=0)["weights"] == n


def test_draft_flops_and_fr_sizes():
    assert spec.draft_output_flops(1024, 4590) == 2 * 1024 * 4590
    assert spec.fr_sizes(73448) == [18362, 4590]
    assert spec.fr_sizes(8192) == [2048, 512]
    with pytest.raises(ValueError, match="fr fractions"):
        spec.fr_sizes(100, [0.0])


def test_bench_table_end_to_end(capsys):
    cfg = mc.ModelConfig.tiny(**{**SMALL, "num_hidden_layers": 1})
    report = spec.run(targets=("0.5b",), random_cfg=cfg, k=2, tree=(2,), fractions=(0.25,), new_tokens=4,
                      big_new_tokens=5, prompt_len=4, reps=1, dtypes=("float32",), decode_steps=2, bw_gbs=10.0,
                      log=lambda m: None, stacked=False)
    assert report in capsys.readouterr().out
    rows = [line for line in report.splitlines() if line.startswith("| random |")]
    assert len(rows) == 2                                       # chain, tree
    assert len([r for r in rows if "chain k=2" in r]) == 1 and len([r for r in rows if "tree (2,)" in r]) == 1
    assert all("random weights" in r for r in rows)
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        accept, per_token, spec_tps, plain_tps, ratio = (float(cells[4]), float(cells[5]), float(cells[6]),
                                                         float(cells[7]), float(cells[8].rstrip("x")))
        assert 1.0 <= accept <= 3.0 and 0.0 < per_token <= 1.0
        # The ratio cell is rounded to two decimals from unrounded rates: allow half its last digit.
        assert ratio == pytest.approx(spec_tps / plain_tps, rel=0.02, abs=0.005)
    assert "| 24 (25.00%) | 0.00154M (full V: 0.00614M) |" in rows[0]   # N = 96 / 4; 2 * 32 * 24, 2 * 32 * 96
    lines = [line for line in report.splitlines() if "of measured bandwidth" in line]
    assert len(lines) == 1 and re.search(r"random float32 +split +layers: .* of measured bandwidth", lines[0])
