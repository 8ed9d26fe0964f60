"""Speculative decoding: FR-Spec ids, the acceptance rules (greedy exactness, the sampling rule's distribution),
and the whole loop against plain `generate` with dense and InfLLM v2 targets, ragged rows, EOS and rollback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minicpm_jax as mc
from minicpm_jax.cli import main as minicpm
from minicpm_jax.speculative import (Draft, accept_greedy, accept_sampled, count_tokens, frequent_ids, init_draft,
                                     speculative_generate)
from minicpm_jax.speculative.hf import load_draft_hf, save_draft_hf


# ------------------------------------------------------------------------------------------------ FR-Spec ids
def test_frequent_ids_takes_the_most_frequent_and_forced_ids():
    counts = count_tokens([np.array([5, 5, 5, 2, 2, 9, 9, 7]), np.array([[2, 0], [9, 1]])], vocab_size=10)
    assert counts.tolist() == [1, 1, 3, 0, 0, 3, 0, 1, 0, 3]
    # 2, 5, 9 tie at 3 (lower id first), then 0, 1, 7 tie at 1
    assert frequent_ids(counts, 4).tolist() == [0, 2, 5, 9]
    assert frequent_ids(counts, 4, always=[8]).tolist() == [2, 5, 8, 9]
    with pytest.raises(ValueError, match="size"):
        frequent_ids(counts, 1, always=[3, 4])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        count_tokens([np.array([3, 10])], vocab_size=10)


# ------------------------------------------------------------------------------------------- acceptance rules
def test_accept_greedy_keeps_the_agreeing_prefix():
    v = 6
    target = np.array([[1, 2, 3, 4], [1, 5, 3, 4], [0, 2, 3, 5]])        # the target's argmax at each position
    logits = jax.nn.one_hot(jnp.asarray(target), v) * 5.0
    drafted = jnp.array([[1, 2, 3], [1, 2, 3], [1, 2, 3]])
    n, nxt = accept_greedy(logits, drafted)
    assert np.asarray(n).tolist() == [3, 1, 0]
    assert np.asarray(nxt).tolist() == [4, 5, 0]


def test_accept_sampled_emits_the_target_distribution():
    """Monte Carlo over 200k draws: the first emitted token follows p_0 and, when d_1 was kept, the second follows
    p_1, even though the drafts come from a q far from p (and q is 0 on a token p likes)."""
    p = jnp.log(jnp.array([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.1, 0.2], [0.25, 0.25, 0.25, 0.25]]))
    q = jnp.log(jnp.array([[0.1, 0.1, 0.8, 0.0], [0.4, 0.1, 0.4, 0.1]]))
    n_draws = 200_000

    def one(key):
        kd, ka = jax.random.split(key)
        d = jax.vmap(lambda kk, ql: jax.random.categorical(kk, ql))(jax.random.split(kd, 2), q)
        n, nxt = accept_sampled(p[None], q[None], d[None], ka)
        first = jnp.where(n[0] >= 1, d[0], nxt[0])
        second = jnp.where(n[0] >= 2, d[1], nxt[0])                      # meaningful when n >= 1
        return first, second, n[0]

    first, second, n = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), n_draws))
    first, second, n = map(np.asarray, (first, second, n))
    f0 = np.bincount(first, minlength=4) / n_draws
    kept = n >= 1
    f1 = np.bincount(second[kept], minlength=4) / kept.sum()
    np.testing.assert_allclose(f0, np.exp(p[0]), atol=0.006)
    np.testing.assert_allclose(f1, np.exp(p[1]), atol=0.008)
    assert 0 < (n == 0).mean() < 1 and (n == 2).any()                 # both branches were exercised


# ------------------------------------------------------------------------------------------------ the loop
SPARSE = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3, dense_len=64)


@pytest.fixture(scope="module")
def target():
    cfg = mc.ModelConfig.tiny(num_hidden_layers=2, vocab_size=300, sparse_config=SPARSE)
    return cfg, mc.init_params(cfg, jax.random.key(1))


def repeat_draft(cfg, params, fr_ids) -> Draft:
    """A draft that proposes its input token again: fc passes the (normalised) embedding through, the layer adds
    nothing, and the FR head scores by similarity to the embeddings (the random tiny target repeats tokens a lot, so many
    proposals are kept, some rejected: every branch of the loop runs)."""
    d = init_draft(cfg, fr_ids, jax.random.key(3))
    h = cfg.hidden_size
    p = jax.tree.map(jnp.asarray, d.params)
    p["fc"]["kernel"] = jnp.concatenate([jnp.eye(h), jnp.zeros((h, h))], axis=0)   # [embedding, hidden] order
    p["fc"]["bias"] = jnp.zeros((h,))
    p["layer"]["self_attn"]["o_proj"]["kernel"] = jnp.zeros_like(p["layer"]["self_attn"]["o_proj"]["kernel"])
    p["layer"]["mlp"]["down_proj"]["kernel"] = jnp.zeros_like(p["layer"]["mlp"]["down_proj"]["kernel"])
    p["fr_head"] = params["embed_tokens"][jnp.asarray(fr_ids)].T
    return d._replace(params=p)


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, n).tolist() for n in lengths]


@pytest.mark.parametrize("attention,lengths", [("dense", (7, 19, 12)), ("sparse", (70, 83))])
@pytest.mark.parametrize("which", ["random", "repeat"])
def test_greedy_speculative_equals_greedy(target, attention, lengths, which):
    cfg, params = target
    fr = np.arange(0, 300)[np.arange(300) % 3 != 1]                     # 2/3 of the vocabulary
    draft = init_draft(cfg, fr, jax.random.key(2)) if which == "random" else repeat_draft(cfg, params, fr)
    prompts = prompts_of(lengths)
    ref = mc.generate(params, cfg, prompts, 24, eos_token_id=[], attention=attention)
    out = mc.generate(params, cfg, prompts, 24, draft=draft, draft_tokens=3, eos_token_id=[], attention=attention)
    assert out.sequences() == ref.sequences()
    assert out.lengths.tolist() == [24] * len(prompts)
    if which == "repeat":
        assert out.accepted.sum() > 0                                    # drafts were kept ...
        assert (out.target_passes < 23).all()                           # ... so fewer target passes than tokens
        print("mean accepted per pass:", (out.accepted + out.target_passes) / out.target_passes)


def test_speculative_stops_at_eos_and_max_tokens(target):
    cfg, params = target
    draft = repeat_draft(cfg, params, np.arange(300))
    prompts = prompts_of((9, 15), seed=4)
    free = mc.generate(params, cfg, prompts, 20, eos_token_id=[], attention="dense").sequences()
    eos = free[0][5]                                                    # row 0 emits it at step 5 (maybe earlier)
    ref = mc.generate(params, cfg, prompts, 20, eos_token_id=[eos], attention="dense")
    out = speculative_generate(params, cfg, draft, prompts, 20, k=4, eos_token_id=[eos], attention="dense")
    assert out.sequences() == ref.sequences()
    assert out.finished.tolist() == ref.finished.tolist()
    np.testing.assert_array_equal(out.tokens, ref.tokens)               # padding after EOS included
    short = speculative_generate(params, cfg, draft, prompts, 2, k=4, eos_token_id=[], attention="dense")
    assert short.sequences() == [s[:2] for s in free]


def test_top_k_one_sampling_is_greedy(target):
    """temperature > 0 with top_k = 1 leaves one token in p: the sampling rule must then emit the greedy tokens."""
    cfg, params = target
    draft = repeat_draft(cfg, params, np.arange(300))
    prompts = prompts_of((11, 6), seed=5)
    ref = mc.generate(params, cfg, prompts, 16, eos_token_id=[], attention="dense")
    out = speculative_generate(params, cfg, draft, prompts, 16, k=3, temperature=0.8, top_k=1, eos_token_id=[],
                               attention="dense", rng=jax.random.key(9))
    assert out.sequences() == ref.sequences()


def test_bad_arguments_are_named(target):
    cfg, params = target
    draft = init_draft(cfg, np.arange(10), jax.random.key(0))
    with pytest.raises(ValueError, match="k >= 1"):
        speculative_generate(params, cfg, draft, [[1, 2]], 4, k=0)
    with pytest.raises(ValueError, match="fr_ids"):
        init_draft(cfg, np.array([3, 2]), jax.random.key(0))


def test_draft_directory_round_trip_and_cli(target, tmp_path, capsys):
    """save_draft_hf / load_draft_hf keep every tensor; `minicpm generate --draft DIR` decodes speculatively and
    prints greedy's tokens; a head built for another target is refused naming the field."""
    cfg, params = target
    draft = repeat_draft(cfg, params, np.arange(0, 300, 2))
    save_draft_hf(tmp_path / "draft", draft, cfg)
    back = load_draft_hf(tmp_path / "draft", cfg)
    assert back.fr_ids.tolist() == draft.fr_ids.tolist()
    for a, b in zip(jax.tree.leaves(draft.params), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))
    with pytest.raises(ValueError, match="hidden_size"):
        load_draft_hf(tmp_path / "draft", cfg.replace(hidden_size=128, num_attention_heads=2))
    with pytest.raises(ValueError, match="-layer target"):
        load_draft_hf(tmp_path / "draft", cfg.replace(num_hidden_layers=3))
    mc.save_hf(tmp_path / "target", cfg, params)
    ids = [5, 17, 99, 3]
    want = mc.generate(params, cfg, [ids], 12, eos_token_id=[]).sequences()[0]
    args = ["generate", "--checkpoint", str(tmp_path / "target"), "--prompt-ids", ",".join(map(str, ids)),
            "--max-new-tokens", "12", "--attention", "dense"]
    assert minicpm(args + ["--draft", str(tmp_path / "draft"), "--draft-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert "tokens per pass" in out.err
    got = [int(t) for t in out.out.strip().split(",")]
    if cfg.eos_ids:                                  # the CLI stops at the config's EOS; greedy above did not
        want = want[:next((i + 1 for i, t in enumerate(want) if t in cfg.eos_ids), len(want))]
    assert got == want
    # a static tree instead of a chain: the same tokens
    assert minicpm(args + ["--draft", str(tmp_path / "draft"), "--draft-tree", "2,1"]) == 0
    out = capsys.readouterr()
    assert "tokens per pass" in out.err
    assert [int(t) for t in out.out.strip().split(",")] == want
    assert minicpm(args + ["--draft-tree", "2,1"]) == 2                  # needs --draft
    assert "--draft-tree needs --draft" in capsys.readouterr().err
    assert minicpm(args + ["--draft", str(tmp_path / "draft"), "--draft-tree", "2,x"]) == 2
    assert "comma-separated" in capsys.readouterr().err
