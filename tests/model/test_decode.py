"""Cached decoding equals the full forward pass; generate handles ragged batches, EOS and sampling knobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minicpm_jax as mc


@pytest.fixture(scope="module")
def model():
    cfg = mc.ModelConfig.tiny(num_hidden_layers=2, vocab_size=512, sparse_config=None)
    return cfg, mc.init_params(cfg, jax.random.key(1))


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_prefill_then_decode_equals_full_forward(model):
    cfg, params = model
    rng = np.random.default_rng(0)
    full = rng.integers(3, cfg.vocab_size, size=(3, 20)).astype(np.int32)
    lengths = np.array([5, 9, 3], np.int32)            # ragged prompts, right-padded
    prompt = np.where(np.arange(20)[None] < lengths[:, None], full, 0)[:, :12]
    cache = mc.init_cache(cfg, 3, 32)
    logits, cache = mc.prefill(params, cfg, jnp.asarray(prompt), jnp.asarray(lengths), cache)
    ref = np.asarray(mc.forward(params, cfg, jnp.asarray(full)))
    errs = [rel(logits, ref[np.arange(3), lengths - 1])]
    for step in range(8):
        tok = full[np.arange(3), lengths + step][:, None]
        logits, cache = mc.decode_step(params, cfg, jnp.asarray(tok), cache)
        errs.append(rel(logits[:, 0], ref[np.arange(3), lengths + step]))
    assert np.asarray(cache.lengths).tolist() == (lengths + 8).tolist()
    print("max relative error cached vs full:", max(errs))
    assert max(errs) < 1e-5


def test_multi_token_decode_step_equals_forward(model):
    cfg, params = model
    ids = np.random.default_rng(1).integers(3, cfg.vocab_size, size=(2, 14)).astype(np.int32)
    cache = mc.init_cache(cfg, 2, 16)
    _, cache = mc.prefill(params, cfg, jnp.asarray(ids[:, :6]), jnp.full((2,), 6, jnp.int32), cache)
    logits, cache = mc.decode_step(params, cfg, jnp.asarray(ids[:, 6:14]), cache)
    ref = mc.forward(params, cfg, jnp.asarray(ids))[:, 6:14]
    assert rel(logits, ref) < 1e-5


def greedy_by_forward(params, cfg, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.argmax(np.asarray(mc.forward(params, cfg, jnp.asarray([seq])))[0, -1])))
    return seq[len(prompt):]


def test_generate_greedy_matches_argmax_of_forward_for_ragged_batch(model):
    cfg, params = model
    prompts = [[1, 17, 99, 4], [1, 250], [1, 3, 9, 27, 81, 243, 5]]
    out = mc.generate(params, cfg, prompts, max_new_tokens=10, eos_token_id=[])
    for p, got in zip(prompts, out.sequences()):
        assert got == greedy_by_forward(params, cfg, p, 10)
    assert out.lengths.tolist() == [10, 10, 10] and not out.finished.any()


def test_generate_stops_at_eos_and_pads(model):
    cfg, params = model
    prompt = [[1, 17, 99, 4]]
    free = mc.generate(params, cfg, prompt, max_new_tokens=8, eos_token_id=[]).sequences()[0]
    eos = free[3]                                       # make the 4th generated token an EOS
    out = mc.generate(params, cfg, prompt, max_new_tokens=8, eos_token_id=[eos], pad_id=0)
    first = free.index(eos)
    assert out.sequences()[0] == free[:first + 1]
    assert out.finished[0] and out.lengths[0] == first + 1
    assert (out.tokens[0, first + 1:] == 0).all()


def test_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    cfg, params = model
    prompt = [[1, 5, 6, 7]]
    kw = dict(max_new_tokens=12, eos_token_id=[])
    a = mc.generate(params, cfg, prompt, temperature=1.0, rng=jax.random.key(3), **kw).sequences()
    b = mc.generate(params, cfg, prompt, temperature=1.0, rng=jax.random.key(3), **kw).sequences()
    c = mc.generate(params, cfg, prompt, temperature=1.0, rng=jax.random.key(4), **kw).sequences()
    greedy = mc.generate(params, cfg, prompt, **kw).sequences()
    topk1 = mc.generate(params, cfg, prompt, temperature=0.7, top_k=1, rng=jax.random.key(5), **kw).sequences()
    tiny_p = mc.generate(params, cfg, prompt, temperature=0.7, top_p=1e-6, rng=jax.random.key(6), **kw).sequences()
    assert a == b and a != c
    assert topk1 == greedy and tiny_p == greedy


def test_sample_token_respects_top_k_and_top_p():
    from minicpm_jax.sampling import sample_token
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda **kw: np.array([int(sample_token(logits, k, 1.0, **kw)[0]) for k in keys])
    assert set(draw(top_k=2, top_p=1.0)) == {0, 1}
    assert set(draw(top_k=0, top_p=0.7)) == {0, 1}          # 0.5 < 0.7 <= 0.8: two tokens
    assert set(draw(top_k=0, top_p=1.0)) == {0, 1, 2, 3}


def test_generate_rejects_bad_prompts(model):
    cfg, params = model
    with pytest.raises(ValueError, match="at least one token"):
        mc.generate(params, cfg, [[1], []])
    with pytest.raises(ValueError, match="outside"):
        mc.generate(params, cfg, [[1, cfg.vocab_size]])
