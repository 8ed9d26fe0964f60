"""The llama.cpp backend (`minicpm_gguf`) on an f32 export of the tiny model against the JAX model.

References: log-probabilities from one unpadded `mc.forward` per request (test_loglikelihood's `direct_loglikelihood`,
no code of either backend), our SentencePiece `Tokenizer` for the GGUF's tokenizer, and the JAX backend's greedy
needle answers. Tolerance for f32: 1e-4 absolute on a continuation's summed log-probability (measured: ~1e-5; the
f32 GGUF holds the same weights, what differs is llama.cpp's summation order), plus 1e-6 per token for a rolling
score summed over ~1700 tokens (measured 3.8e-4 there). The q8_0 file must miss that
tolerance, or the comparison could not tell a quantized model from the original.
"""

from __future__ import annotations

import numpy as np
import pytest
from lm_eval.api.instance import Instance

from minicpm_jax.evals import haystack
from minicpm_jax.evals.gguf_harness import GGUFLM
from minicpm_jax.evals.harness import MiniCPMLM
from minicpm_jax.evals.llama_tokenizer import LlamaCppTokenizer
from minicpm_jax.evals.needles import NeedleSpec, build_items, read_jsonl
from minicpm_jax.evals.suite import SuiteSettings, run_tasks
from tests.evals.conftest import MAX_POS, N_PIECES
from tests.evals.test_loglikelihood import direct_loglikelihood, text, token_logprobs

F32_TOL = 1e-4


@pytest.fixture(scope="module")
def gguf_lm(tiny_gguf):
    return GGUFLM(pretrained=str(tiny_gguf.f32), n_threads=1)


@pytest.fixture(scope="module")
def jax_lm(tiny):
    return MiniCPMLM(pretrained=str(tiny.hf_dir), batch_size=4)


def test_the_gguf_tokenizer_gives_our_ids_offsets_text_and_needle_items(tiny, tiny_gguf):
    ours, theirs = tiny.tokenizer, LlamaCppTokenizer.from_file(tiny_gguf.f32)
    texts = list(haystack.sentences("en")[:40]) + list(haystack.sentences("zh")[:40]) + [
        "  two spaces\tand a tab\n", "龘靐 rare characters", "<|im_start|>user\nhi<|im_end|>\n", "a😀b"]
    for t in texts:
        assert theirs.encode(t, add_bos=True) == ours.encode(t, add_bos=True), t
        assert theirs.encode_with_offsets(t) == ours.encode_with_offsets(t), t
    rng = np.random.default_rng(0)
    for _ in range(200):        # any ids, byte pieces cut mid-character and [PAD] rows past the pieces included
        ids = rng.integers(0, tiny.cfg.vocab_size, 16).tolist()
        assert theirs.decode(ids) == ours.decode([i for i in ids if i < N_PIECES]), ids
    for lang in ("en", "zh"):
        spec = NeedleSpec(lang=lang, lengths=(512, 1024), depths=(0.0, 0.5, 1.0), samples=1, distractors=1)
        assert build_items(theirs, spec) == build_items(ours, spec)
    assert theirs.apply_chat_template([{"role": "user", "content": "hi"}], True) == \
        ours.apply_chat_template([{"role": "user", "content": "hi"}], True)


def _requests(tiny):
    long_ctx = text(120)                       # past 1024 tokens: both sides drop the oldest tokens
    assert len(tiny.tokenizer.encode(long_ctx)) > MAX_POS
    pairs = [(text(2), " " + c) for c in ("the first choice", "another one", "中文的选项")]   # one shared context
    pairs += [(text(3, 50), " " + text(1, 60)), (long_ctx, " " + text(1, 200)), ("", "Hello there.")]
    return [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]


def test_f32_loglikelihood_equals_the_direct_forward(tiny, gguf_lm, tiny_gguf):
    reqs = _requests(tiny)
    got = gguf_lm.loglikelihood(reqs, disable_tqdm=True)
    for req, (lp, greedy) in zip(reqs, got):
        ctx, cont = req.args
        ctx_ids = [tiny.tokenizer.bos_id] + tiny.tokenizer.encode(ctx)
        cont_ids = tiny.tokenizer.encode(cont)
        want = direct_loglikelihood(tiny, ctx_ids, cont_ids)
        assert abs(lp - want) <= F32_TOL, (req.args, lp, want)
        assert isinstance(greedy, bool)
    # rolling: a text longer than the window, scored in disjoint windows (lm-eval's: the first predicts tokens
    # [0, L) from BOS + tokens[:L-1], each later one the next L tokens reading the L tokens before each)
    s = text(40, 300)
    ids = tiny.tokenizer.encode(s)
    assert MAX_POS < len(ids) <= 2 * MAX_POS
    want = float(token_logprobs(tiny, [tiny.tokenizer.bos_id] + ids[:MAX_POS]).sum())
    want += float(token_logprobs(tiny, ids[-MAX_POS - 1:])[-(len(ids) - MAX_POS):].sum())
    [roll] = gguf_lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (s,), 0)], disable_tqdm=True)
    assert abs(roll - want) <= F32_TOL + 1e-6 * len(ids), (roll, want)   # a sum of ~1700 float32 terms
    # the tolerance tells the quantized file from the original
    q8 = GGUFLM(pretrained=str(tiny_gguf.q8_0), n_threads=1)
    diffs = [abs(a[0] - b[0]) for a, b in zip(got, q8.loglikelihood(reqs, disable_tqdm=True))]
    assert max(diffs) > 10 * F32_TOL, diffs


def test_f32_gives_the_jax_models_greedy_needle_answers(jax_lm, gguf_lm, tmp_path):
    s = SuiteSettings(lengths=(256, 512), depths=(0.0, 1.0), samples=2, out_dir=None)
    preds = {}
    for name, lm in (("jax", jax_lm), ("gguf", gguf_lm)):
        out = tmp_path / name
        s.out_dir = out
        r = run_tasks(lm, ["niah_en"], s, log=lambda m: None)
        preds[name] = [p["prediction"] for p in read_jsonl(out / "niah_en.predictions.jsonl")]
        preds[name + "_sha"] = r["tasks"]["niah_en"]["items_sha256"]
    assert preds["jax_sha"] == preds["gguf_sha"]                   # the same items, built by each one's tokenizer
    assert len(preds["jax"]) == 8 and len(set(preds["jax"])) > 1   # varied text: equality below means something
    assert preds["gguf"] == preds["jax"]


def test_a_missing_or_damaged_gguf_is_named(tiny_gguf, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        GGUFLM(pretrained=str(tmp_path / "nope.gguf"))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.f32.read_bytes()[:4096])
    with pytest.raises(ValueError, match="cut.gguf"):
        GGUFLM(pretrained=str(cut))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ValueError, match="junk.gguf"):
        GGUFLM(pretrained=str(junk))
