"""`minicpm train` with a draft section: an EAGLE head trained on a frozen target run with the usual loop (metrics,
eval, checkpoints that resume exactly after a kill), ending with an exported head that decodes exactly; and the
config errors that keep draft and model runs apart."""

import json

import jax
import numpy as np
import pytest

import minicpm_jax as mc
from data_pipeline.pipeline import make_train_iterator
from data_pipeline.prepare import load_prepared
from minicpm_jax.speculative import init_draft
from minicpm_jax.speculative.hf import load_draft_hf
from minicpm_jax.train.config import load_config
from minicpm_jax.train.draft_step import draft_vocabulary
from minicpm_jax.train.metrics import read_metrics
from minicpm_jax.weights import load_weights
from tests.train.conftest import REPO, run_cli, train_overrides

DRAFT = ["train", "--config", "experiments/configs/eagle_draft.yaml"]


@pytest.fixture(scope="module")
def target_run(prepared_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("target") / "t"
    r = run_cli(["train", "--config", "experiments/configs/tiny.yaml"] + train_overrides(out, prepared_data_dir, 4))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def draft_args(target, data, out, extra=()):
    """The shipped draft config on the test data: the target's shapes come from its run, not from overrides."""
    base = [a for a in train_overrides(out, data, 6, ["train.checkpoint_every=2", "draft.fr_size=96",
                                                      "draft.fr_count_batches=8", "data.tokenizer.path=null"])
            if not a.startswith("model.")]
    return DRAFT + base + [f"draft.target={target}"] + list(extra)


def train_losses(run_dir) -> dict:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"}


@pytest.fixture(scope="module")
def draft_run(target_run, prepared_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("draft") / "d"
    r = run_cli(draft_args(target_run, prepared_data_dir, out, ["train.eval_every=3", "train.sample_prompts=[The,A]",
                                                                "draft.check_tokens=12"]))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def test_draft_run_trains_evaluates_and_exports_a_head_that_decodes_exactly(draft_run, target_run):
    out, stdout = draft_run
    rows = read_metrics(out)
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7))
    assert all(0 <= r["fr_top1"] <= 1 and r["feature_loss"] > 0 and r["lr"] >= 0 for r in train) and train[-1]["lr"] > 0
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6] and all("fr_top1" in r and "perplexity" not in r for r in evals)
    summary = json.loads((out / "summary.json").read_text())
    sp = summary["speculative"]
    assert sp["exact"] is True and 1.0 <= sp["tokens_per_pass"] <= sp["draft_tokens"] + 1
    assert len(summary["samples"]) == 2 and "speculative decoding (k=4)" in stdout
    # the exported head is a trained one (every tensor moved from the init), over the recorded FR ids, and decodes
    # exactly like plain greedy
    target = load_weights(target_run)
    head = load_draft_hf(summary["outputs"]["draft_hf"], target.cfg)
    ids = json.loads((out / "draft_vocabulary.json").read_text())["ids"]
    assert head.fr_ids.tolist() == ids and len(ids) == 96
    fresh = init_draft(target.cfg, np.asarray(ids), jax.random.key(0), target.params)     # seed 0: the run's init
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
             zip(jax.tree.leaves(head.params), jax.tree.leaves(fresh.params))]
    assert min(moved) > 0, "a tensor of the exported head is still at its initial value"
    prompts = [[1, 5, 9, 30], [1, 7]]
    plain = mc.generate(target.params, target.cfg, prompts, 10)
    spec = mc.generate(target.params, target.cfg, prompts, 10, draft=head, draft_tokens=3)
    assert plain.sequences() == spec.sequences()


def test_fr_vocabulary_is_the_most_frequent_ids_of_the_run_data_plus_specials(target_run, prepared_data_dir):
    exp = load_config(REPO / "experiments/configs/eagle_draft.yaml",
                      [f"draft.target={target_run}", f"data_dir={prepared_data_dir}", "draft.fr_size=40",
                       "draft.fr_count_batches=5", "data.tokenizer.path=null", "data.seq_len=64", "data.batch_size=4",
                       "data.sources=[pip]", "data.vocab_size=512", "data.max_docs_per_source=120",
                       "data.max_mb_per_source=0.15", "data.classifier.rounds=1", "data.tokenizer.max_train_mb=1.0"])
    prepared = load_prepared(prepared_data_dir)
    cfg = load_weights(target_run).cfg
    ids = draft_vocabulary(exp, prepared, cfg)
    # reference: count the same five batches with np.unique
    it = make_train_iterator(prepared, exp.data, process_index=0, process_count=1)
    toks = np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b, _ in zip(it, range(5))])
    vals, counts = np.unique(toks, return_counts=True)
    tok = prepared.tokenizer
    specials = {tok.bos_id, tok.eos_id, *cfg.eos_ids} | {i for i in (tok.im_start_id, tok.im_end_id) if i is not None}
    assert specials <= set(ids.tolist()) and len(ids) == 40 and np.all(np.diff(ids) > 0)
    others = sorted(((-c, v) for v, c in zip(vals, counts) if v not in specials))[:40 - len(specials)]
    assert {v for _, v in others} <= set(ids.tolist())


def test_kill_during_save_then_resume_reproduces_the_draft_losses(draft_run, target_run, prepared_data_dir, tmp_path):
    out = tmp_path / "d2"
    args = draft_args(target_run, prepared_data_dir, out, ["train.eval_every=3", "train.sample_prompts=[]"])
    killed = run_cli(args, {"MINICPM_FAULT": "during_save:4"})
    assert killed.returncode == 17, killed.stdout[-2000:] + killed.stderr[-2000:]
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "checkpoints/2" in resumed.stdout
    a, b = train_losses(draft_run[0]), train_losses(out)
    assert sorted(b) == list(range(1, 7)) and [b[s] for s in range(1, 7)] == [a[s] for s in range(1, 7)]


def test_draft_and_model_runs_do_not_mix(target_run, prepared_data_dir, tmp_path):
    r = run_cli(draft_args(target_run, prepared_data_dir, target_run))      # the target's own run directory
    assert r.returncode != 0 and "its checkpoints are of a model, this config trains a draft head" in r.stderr


@pytest.mark.parametrize("extra, message", [
    (["train.init_from=runs/tiny"], "draft.target: a draft run trains a new head"),
    (["export.gguf_qtypes=[f32]"], "export.gguf_qtypes: a draft head is exported as an HF directory"),
    (["draft.fr_fraction=0"], "draft.fr_fraction: must be in"),
    (["draft.target=null", "draft.target_step=3"], "draft.target_step: only means something with draft.target"),
])
def test_config_errors_name_the_field(extra, message):
    with pytest.raises(ValueError, match=message):
        load_config(REPO / "experiments/configs/eagle_draft.yaml", extra)


def test_shipped_config_points_at_the_tiny_run():
    exp = load_config(REPO / "experiments/configs/eagle_draft.yaml")
    assert exp.draft.target == "runs/tiny" and exp.data.tokenizer.path == "runs/tiny/tokenizer"
    assert exp.export.gguf_qtypes == ()
