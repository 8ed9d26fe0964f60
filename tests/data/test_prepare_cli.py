"""prepare_data (one call, cached per step) and the `data` command line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from data_pipeline.prepare import format_summary, load_prepared, prepare_data

REPO = Path(__file__).resolve().parents[2]


def stamps(w: Path) -> dict:
    return {d: (w / d / "stamp.json").read_text() for d in ("corpus", "tokenizer", "classifier", "tokens")}


def test_prepared_outputs(prepared, data_cfg):
    s = prepared.summary
    assert s["corpus"]["pip_only"] and s["tokenizer"]["vocab_size"] == data_cfg.vocab_size
    assert set(prepared.shards("train")) == {"wiki_en", "peoples_daily_zh", "reviews_zh", "python_code",
                                             "python_docstrings_en", "package_licences"}
    assert set(prepared.shards("eval")) == {"wiki_en", "peoples_daily_zh", "python_reference_en"}
    assert all(Path(p).exists() for v in prepared.shards("train").values() for p in v)
    assert prepared.tokenizer.vocab_size == data_cfg.vocab_size and prepared.classifier() is not None
    assert 1.5 < s["tokenizer"]["eval_bytes_per_token"] < 5
    text = format_summary(prepared)
    assert "pip-only" in text and "classifier round 1" in text
    again = load_prepared(prepared.workdir)
    assert again.train_shards == prepared.train_shards and again.summary == prepared.summary


def test_cached_steps_are_skipped_and_changes_rebuild_only_downstream(prepared, data_cfg, tmp_path):
    w = prepared.workdir
    before = stamps(w)
    p2 = prepare_data(w, data_cfg, progress=False)
    assert stamps(w) == before and p2.train_shards == prepared.train_shards
    assert p2.summary["total_seconds"] < 3  # nothing rebuilt
    # another threshold changes nothing on disk: filtering happens in the pipeline
    cfg = data_cfg.replace(classifier=dataclasses.replace(data_cfg.classifier, threshold=0.7))
    prepare_data(w, cfg, progress=False)
    assert stamps(w) == before
    # a classifier setting rebuilds the classifier and the token shards, not the corpus or tokenizer
    cfg = data_cfg.replace(classifier=dataclasses.replace(data_cfg.classifier, confident_pos=0.95))
    prepare_data(w, cfg, progress=False)
    after = stamps(w)
    assert after["corpus"] == before["corpus"] and after["tokenizer"] == before["tokenizer"]
    assert after["classifier"] != before["classifier"] and after["tokens"] != before["tokens"]
    prepare_data(w, data_cfg, progress=False)  # back to the session's config for the other tests
    assert not [p for p in w.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_user_tokenizer_is_used_as_is(prepared, data_cfg, tmp_path):
    tok_dir = prepared.tokenizer.save(tmp_path / "mine")
    cfg = data_cfg.replace(tokenizer=dataclasses.replace(data_cfg.tokenizer, path=str(tok_dir)),
                           classifier=dataclasses.replace(data_cfg.classifier, rounds=1))
    p = prepare_data(tmp_path / "w", cfg, progress=False)
    assert p.tokenizer_dir == tok_dir.resolve() and not (tmp_path / "w" / "tokenizer").exists()
    too_small = cfg.replace(vocab_size=1000)
    try:
        prepare_data(tmp_path / "w", too_small, progress=False)
    except ValueError as e:
        assert "data.vocab_size (1000) is smaller" in str(e)
    else:
        raise AssertionError("a tokenizer larger than vocab_size must be refused")


def run_cli(*args, cwd=REPO):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "minicpm_jax.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_build_score_stats(prepared, tmp_path):
    r = run_cli("data", "build", "--out", str(tmp_path / "c"), "--sources", "wiki_en,reviews_zh", "--no-download",
                "max_docs_per_source=30")
    assert r.returncode == 0, r.stderr
    assert "wiki_en" in r.stdout and "reviews_zh" in r.stdout and (tmp_path / "c" / "manifest.json").exists()
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "The history of Rome spans twenty-eight centuries."}\n{oops\n{"title": 1}\n')
    r = run_cli("data", "score", str(bad), str(tmp_path / "c"), "--classifier", str(prepared.classifier_dir),
                "--out", str(tmp_path / "scored.jsonl"))
    assert r.returncode == 0, r.stderr
    assert "dropped 2 item(s)" in r.stdout and f"{bad}: bad_json=1, missing_field=1" in r.stdout
    rows = [json.loads(x) for x in open(tmp_path / "scored.jsonl")]
    n_corpus = json.loads((tmp_path / "c" / "manifest.json").read_text())["total"]["docs"]
    assert len(rows) == 1 + n_corpus and all(0 <= x["score"] <= 1 and x["keep"] == (x["score"] >= 0.5) for x in rows)
    r = run_cli("data", "stats", str(tmp_path / "scored.jsonl"), "--png", str(tmp_path / "h.png"))
    assert r.returncode == 0, r.stderr
    assert "kept at threshold 0.5" in r.stdout and (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    r = run_cli("data", "stats", str(prepared.workdir))
    assert r.returncode == 0 and "python_reference_en" in r.stdout and "held out" in r.stdout
    assert (prepared.workdir / "score_hist.png").exists()


def test_cli_errors_are_one_line(tmp_path):
    r = run_cli("data", "build", "--out", str(tmp_path / "c"), "seq_len=oops")
    assert r.returncode == 2 and "seq_len" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("data", "stats", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "not a corpus dir" in r.stderr


def test_register_adds_every_subcommand():
    from minicpm_jax.cli import build_parser

    parser = build_parser()
    for cmd in ("build --out x", "train-tokenizer --corpus c --out x", "train-classifier --corpus c --out x",
                "score in.jsonl --classifier c --out x", "stats p", "sft --tokenizer t --out x",
                "prepare --workdir w", "process in.jsonl --out o --classifier c --tokenizer t"):
        args = parser.parse_args(["data", *cmd.split()])
        assert callable(args.func)
    assert callable(parser.parse_args(["bench", "data", "--train-tokens-per-s", "5"]).func)
