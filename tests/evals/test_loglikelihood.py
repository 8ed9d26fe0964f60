"""The lm-eval backend's scoring against log-probabilities computed directly from `mc.forward`, one request at a
time with no padding, batching or bucketing: `loglikelihood` (contexts that fit and contexts past the model's 1024
positions, which lose their oldest tokens), its greedy flag, and `loglikelihood_rolling`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_eval.api.instance import Instance

import minicpm_jax as mc
from minicpm_jax.evals import haystack
from minicpm_jax.evals.harness import MiniCPMLM
from tests.evals.conftest import MAX_POS


@pytest.fixture(scope="module")
def lm(tiny):
    return MiniCPMLM(pretrained=str(tiny.hf_dir), batch_size=3)


def token_logprobs(tiny, ids: list[int]) -> np.ndarray:
    """log p(ids[i+1] | ids[:i+1]) for i in 0..len-2, one unpadded forward (float64 on the host)."""
    logits = mc.forward(tiny.params, tiny.cfg, jnp.asarray(ids[:-1], jnp.int32)[None])[0]
    lp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    return lp[np.arange(len(ids) - 1), ids[1:]]


def direct_loglikelihood(tiny, ctx_ids: list[int], cont_ids: list[int]) -> float:
    whole = ctx_ids + cont_ids
    window = whole[-(MAX_POS + 1):]                    # the model reads at most MAX_POS tokens
    return float(token_logprobs(tiny, window)[-len(cont_ids):].sum())


def text(n_sentences: int, start: int = 0) -> str:
    return " ".join(haystack.sentences("en")[start:start + n_sentences])


def requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def test_loglikelihood_equals_forward_including_left_truncation(lm, tiny):
    long_ctx = text(80, 100)                               # ~2000 tokens: past the 1024 positions
    pairs = [("The history of", " the world"), (text(3), " is done."), (long_ctx, " " + text(1, 400)),
             (long_ctx + " " + text(5, 300), " and so it ends."), ("", "A whole sentence on its own.")]
    tok = tiny.tokenizer
    n_long = len(tok.encode(long_ctx, add_bos=True))
    assert n_long > MAX_POS + 200, n_long
    got = lm.loglikelihood(requests(pairs))
    for (ctx, cont), (lp, _) in zip(pairs, got):
        if ctx:
            ctx_ids = tok.encode(ctx, add_bos=True)
            cont_ids = tok.encode(ctx + cont, add_bos=True)[len(ctx_ids):]
        else:                                              # an empty context is conditioned on BOS
            ctx_ids, cont_ids = [tok.bos_id], tok.encode(cont)
        ref = direct_loglikelihood(tiny, ctx_ids, cont_ids)
        assert lp == pytest.approx(ref, abs=1e-4), (ctx[:40], cont, lp, ref)


def test_batch_size_and_order_do_not_change_scores(tiny, lm):
    pairs = [(text(2, i * 7), " " + text(1, 500 + i)) for i in range(7)]
    one = MiniCPMLM(pretrained=str(tiny.hf_dir), batch_size=1).loglikelihood(requests(pairs))
    many = lm.loglikelihood(requests(pairs))
    np.testing.assert_allclose([x for x, _ in one], [x for x, _ in many], atol=1e-4)


def test_greedy_flag(lm, tiny):
    """A continuation made of the model's own argmax tokens is greedy; change its last token and it is not."""
    ctx = tiny.tokenizer.encode(text(2), add_bos=True)
    seq = list(ctx)
    for _ in range(5):
        logits = mc.forward(tiny.params, tiny.cfg, jnp.asarray(seq, jnp.int32)[None])[0, -1]
        seq.append(int(jnp.argmax(logits)))
    cont = seq[len(ctx):]
    other = cont[:-1] + [(cont[-1] + 1) % tiny.cfg.vocab_size]
    (lp_g, greedy_g), (lp_o, greedy_o) = lm._loglikelihood_tokens([(None, ctx, cont), (None, ctx, other)])
    assert greedy_g and not greedy_o
    assert lp_g == pytest.approx(direct_loglikelihood(tiny, ctx, cont), abs=1e-4)
    assert lp_o < lp_g


def test_loglikelihood_rolling_is_the_whole_text_scored_in_windows(lm, tiny):
    tok = tiny.tokenizer
    short, long = text(4), text(90, 200)
    ids_short, ids_long = tok.encode(short), tok.encode(long)
    assert len(ids_long) > 2 * MAX_POS
    got_short, got_long = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (s,), i)
                                                    for i, s in enumerate((short, long))])
    assert got_short == pytest.approx(float(token_logprobs(tiny, [tok.bos_id] + ids_short).sum()), abs=1e-4)
    # lm-eval's windows: the first predicts tokens [0, L) from BOS + tokens[:L-1]; each later one the next (at most)
    # L tokens, reading the L tokens before each
    ref = float(token_logprobs(tiny, [tok.bos_id] + ids_long[:MAX_POS]).sum())
    done = MAX_POS
    while done < len(ids_long):
        end = min(done + MAX_POS, len(ids_long))
        window = ids_long[end - MAX_POS - 1:end]
        ref += float(token_logprobs(tiny, window)[-(end - done):].sum())
        done = end
    assert got_long == pytest.approx(ref, abs=1e-3)


def test_model_argument_errors(tiny):
    with pytest.raises(ValueError, match="pretrained="):
        MiniCPMLM()
    with pytest.raises(ValueError, match="unknown model arguments"):
        MiniCPMLM(pretrained=str(tiny.hf_dir), temprature=0.5)
    with pytest.raises(ValueError, match="batch_size=auto"):
        MiniCPMLM(pretrained=str(tiny.hf_dir), batch_size="auto")
    with pytest.raises(ValueError, match="max_length=2048 exceeds"):
        MiniCPMLM(pretrained=str(tiny.hf_dir), max_length=2048)
    with pytest.raises(ValueError, match="dtype= applies to HF"):
        MiniCPMLM(pretrained=str(tiny.run_dir), dtype="float32")
    with pytest.raises(FileNotFoundError, match="no step 7"):
        MiniCPMLM(pretrained=str(tiny.run_dir), step=7)


@pytest.mark.parametrize("variant", ["minicpm4.1", "minicpm4"])
def test_sparse_rows_score_as_they_would_alone(tiny, variant):
    """InfLLM v2 (attention="auto", dense below 256 tokens): a batch mixing a short row (dense) and long rows (sparse,
    with few enough blocks selected that it differs from dense) scores each as its own unpadded forward."""
    from minicpm_jax.sparse.config import SparseConfig
    from minicpm_jax.weights import Weights

    sparse = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3,
                          dense_len=256, variant=variant)
    cfg = tiny.cfg.replace(sparse_config=sparse)
    w = Weights(cfg, tiny.params, tiny.tokenizer, tiny.hf_dir, "hf", attention="auto")
    lm = MiniCPMLM(weights=w, batch_size=3)
    tok = tiny.tokenizer
    pairs = [(text(2), " " + text(1, 600)), (text(10, 50), " " + text(2, 700)), (text(16, 10), " and the end.")]
    got = lm.loglikelihood(requests(pairs))
    for (ctx, cont), (lp, _) in zip(pairs, got):
        ctx_ids = tok.encode(ctx, add_bos=True)
        whole = tok.encode(ctx + cont, add_bos=True)
        n = len(whole) - len(ctx_ids)
        assert len(whole) <= MAX_POS
        logits = {m: mc.forward(tiny.params, cfg, jnp.asarray(whole[:-1], jnp.int32)[None], attention=m)[0]
                  for m in ("auto", "dense")}
        ref = {m: float(np.asarray(jax.nn.log_softmax(v, -1), np.float64)[np.arange(len(whole) - 1), whole[1:]]
                        [-n:].sum()) for m, v in logits.items()}
        assert lp == pytest.approx(ref["auto"], abs=1e-4)
        if len(whole) > 300:
            assert abs(ref["auto"] - ref["dense"]) > 1e-3      # the long rows really ran sparse
    assert sum(len(tok.encode(c + x)) > 300 for c, x in pairs) == 2


def test_chat_template_renders_and_encodes_as_the_tokenizer_does(lm, tiny):
    """lm-eval's --apply_chat_template: the rendered ChatML text encodes to the tokenizer's own chat ids (one BOS,
    the <|im_start|>/<|im_end|> markers as single tokens)."""
    msgs = [{"role": "user", "content": "What is a generator?"}]
    rendered = lm.apply_chat_template(msgs, add_generation_prompt=True)
    ids = lm.tok_encode(rendered)
    assert ids == tiny.tokenizer.encode_chat(msgs, add_generation_prompt=True)[0]
    assert ids.count(tiny.tokenizer.bos_id) == 1 and ids.count(tiny.tokenizer.im_start_id) == 2
    assert lm.chat_template(True) == tiny.tokenizer.chat_template and lm.chat_template(False) is None
