"""`generate_until` of the lm-eval backend: the same greedy tokens as `mc.generate` (the model's cached decode
path), text cut before the first stop string with decoding stopped there, and prompts past the window left-truncated."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance

import minicpm_jax as mc
from minicpm_jax.evals import haystack
from minicpm_jax.evals.generation import cut_at_stop, generate_until
from minicpm_jax.evals.harness import MiniCPMLM
from tests.evals.conftest import MAX_POS

PROMPTS = ["The history of", "Python evaluates expressions from left to right.", "上海正在逐步发展成为"]


@pytest.fixture(scope="module")
def lm(tiny):
    return MiniCPMLM(pretrained=str(tiny.hf_dir), batch_size=4)


def gen(lm, contexts, **kw):
    return lm.generate_until([Instance("generate_until", {}, (c, dict(kw)), i) for i, c in enumerate(contexts)])


def test_greedy_text_is_mc_generate(lm, tiny):
    got = gen(lm, PROMPTS, until=[], max_gen_toks=24)
    ids = [tiny.tokenizer.encode(p, add_bos=True) for p in PROMPTS]
    ref = mc.generate(tiny.params, tiny.cfg, ids, max_new_tokens=24, eos_token_id=[tiny.tokenizer.eos_id])
    assert got == [lm.tok_decode(s) for s in ref.sequences()]
    assert len(set(got)) == len(got) and all(len(set(t.split())) > 3 for t in got), got   # varied text


def test_stops_at_the_first_stop_string(lm, tiny):
    free = gen(lm, PROMPTS[:1], until=[], max_gen_toks=40)[0]
    words = free.split()
    stop = words[len(words) // 2]                      # a string from the middle of the free-running text
    expect = free[:free.index(stop)]
    assert gen(lm, PROMPTS[:1], until=[stop], max_gen_toks=40) == [expect]
    # two stop strings: the earlier occurrence wins
    first = min(free.index(stop), free.index(words[1]))
    assert gen(lm, PROMPTS[:1], until=[stop, words[1]], max_gen_toks=40) == [free[:first]]
    # and decoding stopped on the step that completed it, not after all 40
    prompt = tiny.tokenizer.encode(PROMPTS[0], add_bos=True)
    g = generate_until(tiny.params, tiny.cfg, [prompt], lm.tok_decode, stop=[stop], max_new_tokens=40,
                       eos_ids=lm.eos_ids)[0]
    assert g.stopped == "stop" and g.text == expect
    assert stop in lm.tok_decode(g.tokens) and stop not in lm.tok_decode(g.tokens[:-1])


def test_rows_of_a_batch_stop_independently(lm):
    free = gen(lm, PROMPTS, until=[], max_gen_toks=30)
    stop = free[1].split()[2]
    got = gen(lm, PROMPTS, until=[stop], max_gen_toks=30)
    assert got == [cut_at_stop(t, [stop])[0] for t in free]
    assert got[1] == free[1][:free[1].index(stop)]


def test_prompt_past_the_window_keeps_its_last_tokens(lm, tiny):
    long = " ".join(haystack.sentences("en")[:80])
    ids = tiny.tokenizer.encode(long, add_bos=True)
    assert len(ids) > MAX_POS
    got = gen(lm, [long], until=[], max_gen_toks=16)[0]
    ref = mc.generate(tiny.params, tiny.cfg, [ids[-(MAX_POS - 16):]], max_new_tokens=16,
                      eos_token_id=[tiny.tokenizer.eos_id])
    assert got == lm.tok_decode(ref.sequences()[0])


def test_cut_at_stop():
    assert cut_at_stop("abc\n\ndef", ["\n\n", "c"]) == ("ab", True)
    assert cut_at_stop("abc", ["x", ""]) == ("abc", False)


def test_sparse_model_decodes_as_mc_generate(tiny):
    """InfLLM v2 above 256 tokens: the batch (one short, one long prompt) decodes through the sparse prefill and the
    compressed-key decode cache, token for token as mc.generate does."""
    from minicpm_jax.sparse.config import SparseConfig
    from minicpm_jax.weights import Weights

    cfg = tiny.cfg.replace(sparse_config=SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1,
                                                      window_size=32, topk=3, dense_len=256))
    lm = MiniCPMLM(weights=Weights(cfg, tiny.params, tiny.tokenizer, tiny.hf_dir, "hf", attention="auto"))
    prompts = [PROMPTS[1], " ".join(haystack.sentences("en")[:12])]
    ids = [tiny.tokenizer.encode(p, add_bos=True) for p in prompts]
    assert len(ids[1]) > 300
    got = gen(lm, prompts, until=[], max_gen_toks=12)
    ref = mc.generate(tiny.params, cfg, ids, max_new_tokens=12, eos_token_id=[tiny.tokenizer.eos_id])
    assert got == [lm.tok_decode(s) for s in ref.sequences()]
