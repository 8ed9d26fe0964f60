"""Speculative decoding with static draft trees, and the whole speculative loop's distribution when sampling.

Each reference shares no code with what it checks: plain `generate` / `decode_step` / `forward` for the tree's
tokens, logits and caches; probabilities computed here from `forward` for the sampling loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import minicpm_jax as mc
from minicpm_jax.kv_cache import truncate_cache
from minicpm_jax.sparse import SparseConfig, compressed_cache_from_keys
from minicpm_jax.sparse.reference import dense_causal_reference, infllm_v2_reference
from minicpm_jax.speculative import init_draft, speculative_generate
from minicpm_jax.speculative.draft import draft_apply, draft_tree_apply, init_draft_cache
from minicpm_jax.speculative.tree import Tree
from minicpm_jax.speculative.tree_accept import accept_tree_greedy
from minicpm_jax.speculative.tree_step import compact_tree_cache, tree_verify_step
from minicpm_jax.tree_attention import tree_dense_attention, tree_sparse_attention
from tests.model.test_speculative import SPARSE, prompts_of, repeat_draft


@pytest.fixture(scope="module")
def target():
    cfg = mc.ModelConfig.tiny(num_hidden_layers=2, vocab_size=300, sparse_config=SPARSE)
    return cfg, mc.init_params(cfg, jax.random.key(1))


def test_tree_topology():
    t = Tree((2, 3))
    assert t.num_nodes == 1 + 2 + 6 and t.level_starts == (0, 1, 3, 9)
    assert t.parent.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert t.node_depth.tolist() == [0, 1, 1, 2, 2, 2, 2, 2, 2]
    assert t.paths[7].tolist() == [0, 2, 7] and t.paths[2].tolist() == [0, 2, 2]
    assert np.nonzero(t.ancestors[7])[0].tolist() == [0, 2, 7]
    assert t.draft_layout(2).offset == 2 and t.draft_layout(2).mask_array().shape == (6, 8)
    for bad in ((), (2, 0), [2, 1]):
        with pytest.raises(ValueError, match="tree must be"):
            Tree(bad)


def test_tree_arguments_are_named(target):
    cfg, params = target
    draft = init_draft(cfg, np.arange(300), jax.random.key(0))
    with pytest.raises(ValueError, match="children of a node"):
        speculative_generate(params, cfg, draft, [[1, 2]], 4, tree=(301, 1))
    with pytest.raises(ValueError, match="tree must be"):
        speculative_generate(params, cfg, draft, [[1, 2]], 4, tree=(2, 0))
    with pytest.raises(ValueError, match="draft_tree needs a draft"):
        mc.generate(params, cfg, [[1, 2]], 4, draft_tree=(2, 1))


def test_greedy_tree_speculative_equals_greedy_sparse(target):
    """Ragged rows of an InfLLM v2 target: they reach 7 blocks of 16 while 5 are attended, so selection happens,
    and the tree's paths complete kernels (stride 4) inside the step."""
    cfg, params = target
    draft = repeat_draft(cfg, params, np.arange(0, 300)[np.arange(300) % 3 != 1])
    prompts = prompts_of((70, 83))
    ref = mc.generate(params, cfg, prompts, 24, eos_token_id=[], attention="sparse")
    out = mc.generate(params, cfg, prompts, 24, draft=draft, draft_tree=(3, 2, 1), eos_token_id=[],
                      attention="sparse")
    assert out.sequences() == ref.sequences()
    assert out.accepted.sum() > 0 and (out.target_passes < 23).all()
    print("tree (sparse): mean tokens per pass:", (out.accepted + out.target_passes) / out.target_passes)


def oracle(ref: np.ndarray, rule):
    """A proposer (the `propose_fn` seam). rule per row: "right" (its best token at depth d is the target's greedy
    token there), "wrong" (its top tokens never include it) or "draft" (the draft's own logits). ref: the greedy
    continuation [B, T] (ref[:, 0] is the first emitted token). Full-vocabulary FR ids: FR index = token id."""
    ref = jnp.asarray(ref)
    right = jnp.asarray([r == "right" for r in rule])
    own = jnp.asarray([r == "draft" for r in rule])

    def propose(fr, n_gen, depth):
        idx = jnp.minimum(n_gen + depth - 1, ref.shape[1] - 1)
        tok = ref[jnp.arange(ref.shape[0]), idx]
        v = fr.shape[-1]
        good = jax.nn.one_hot(tok, v) * 10.0
        bad = jax.nn.one_hot((tok + 1) % v, v) * 10.0 - jax.nn.one_hot(tok, v) * 10.0
        out = jnp.where(right[:, None], good, bad)
        out = out.reshape((out.shape[0],) + (1,) * (fr.ndim - 2) + (v,))            # [B, 1.., V]
        return jnp.where(own.reshape((-1,) + (1,) * (fr.ndim - 1)), fr, jnp.broadcast_to(out, fr.shape))
    return propose


@pytest.mark.parametrize("shape", [dict(k=3), dict(tree=(3, 2, 1))])
def test_right_wrong_and_real_drafts(target, shape):
    """Ragged rows, dense target: an always-right proposer emits k+1 (chain) / depth+1 (tree) tokens per target pass,
    an always-wrong one keeps nothing (one token per pass), the draft head itself something in between; all three
    rows give greedy's tokens."""
    cfg, params = target
    draft = repeat_draft(cfg, params, np.arange(300))
    prompts = prompts_of((7, 19, 12))
    ref = mc.generate(params, cfg, prompts, 24, eos_token_id=[], attention="dense")
    out = speculative_generate(params, cfg, draft, prompts, 24, eos_token_id=[], attention="dense",
                               propose_fn=oracle(ref.tokens, ["right", "wrong", "draft"]), **shape)
    assert out.sequences() == ref.sequences()
    # 23 tokens after the first: 4 per pass for the right row (6 passes; the last, cut at 3 tokens, emits 3 drafted
    # ones: 5 * 3 + 3 kept), 1 per pass for the wrong one
    assert out.target_passes[:2].tolist() == [6, 23] and out.accepted[:2].tolist() == [18, 0]
    assert out.accepted[2] > 0 and out.target_passes[2] < 23
    print(shape, "draft row: tokens per pass", (out.accepted[2] + out.target_passes[2]) / out.target_passes[2])


def test_draft_tree_levels_equal_chains(target):
    """The draft's tree steps (one layer run per depth over all nodes, tree mask over its own cache) give every
    node what the draft's chain step gives along that node's root path."""
    cfg, params = target
    draft = init_draft(cfg, np.arange(300), jax.random.key(4))
    tree, b, n0 = Tree((2, 3)), 2, 13
    ks = jax.random.split(jax.random.key(5), 3)
    feats = jax.random.normal(ks[0], (b, n0, cfg.hidden_size))
    ids = jax.random.randint(ks[1], (b, n0), 3, 300)
    emb = params["embed_tokens"]
    cache = init_draft_cache(draft, b, 32)
    _, _, cache = jax.jit(lambda f, i, c: draft_apply(draft, emb, f, i, c))(feats, ids, cache)
    cache = truncate_cache(cache, draft.cfg, jnp.array([n0, n0 - 4]))       # ragged rows
    tok = jax.random.randint(ks[2], (b, tree.num_nodes), 3, 300)
    root_feat = jax.random.normal(ks[0], (b, 1, cfg.hidden_size))
    tree_apply = jax.jit(lambda f, i, c, depth: draft_tree_apply(draft, emb, f, i, c, tree.draft_layout(depth),
                                                                 depth), static_argnums=3)
    h1, fr1, c1 = tree_apply( jnp.repeat(root_feat, 2, axis=1), tok[:, 1:3], cache, 1)
    h2, fr2, _ = tree_apply(jnp.repeat(h1, 3, axis=1), tok[:, 3:], c1, 2)
    # the chain reference: one row per (row, depth-2 node), its root path's two pairs appended to the same cache
    leaves = np.arange(3, tree.num_nodes)
    parents = tree.parent[leaves]
    rep = lambda x: jnp.repeat(x, len(leaves), axis=0)
    chain_feats = jnp.concatenate([rep(root_feat), h1[:, parents - 1].reshape(-1, 1, cfg.hidden_size)], axis=1)
    chain_ids = jnp.stack([tok[:, parents], tok[:, leaves]], axis=-1).reshape(-1, 2)
    hc, frc, _ = jax.jit(lambda f, i, c: draft_apply(draft, emb, f, i, c))(
        chain_feats, chain_ids, cache.replace(k=jnp.repeat(cache.k, len(leaves), axis=1),
                                              v=jnp.repeat(cache.v, len(leaves), axis=1), lengths=rep(cache.lengths)))
    hc, frc = hc.reshape(b, len(leaves), 2, -1), frc.reshape(b, len(leaves), 2, -1)
    np.testing.assert_allclose(h1[:, parents - 1], hc[:, :, 0], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(h2, hc[:, :, 1], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(fr2, frc[:, :, 1], rtol=2e-5, atol=2e-4)


# ------------------------------------------------------------------------------------------ tree attention
def test_tree_attention_equals_attention_over_each_root_path():
    """tree_dense_attention and tree_sparse_attention (reference, xla, pallas in interpret mode) against the
    InfLLM v2 reference / plain causal attention over each node's own sequence (prefix + root path), built here
    with numpy; ragged rows, selection active (10 blocks of 16, 5 attended), kernels straddling the tree. The
    "minicpm4" variant here; the loop tests run the default "minicpm4.1"."""
    variant = "minicpm4"
    scfg = SparseConfig(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, window_size=32, topk=3,
                        dense_len=-1, variant=variant)
    tree = Tree((2, 2))
    layout = tree.verify_layout()
    b, s, hq, hkv, d, n = 2, 176, 4, 2, 32, tree.num_nodes
    ks = jax.random.split(jax.random.key(8), 3)
    q = jax.random.normal(ks[0], (b, n, hq, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, s, hkv, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, s, hkv, d), jnp.float32)
    base = np.array([150, 133], np.int32)
    views_k, views_v, last = np.zeros((b * n, s, hkv, d), np.float32), np.zeros((b * n, s, hkv, d), np.float32), []
    for r in range(b):
        for i in range(n):
            slots = list(range(base[r])) + [base[r] + j for j in tree.paths[i, :tree.node_depth[i] + 1]]
            views_k[r * n + i, :len(slots)] = np.asarray(k)[r, slots]
            views_v[r * n + i, :len(slots)] = np.asarray(v)[r, slots]
            last.append(len(slots) - 1)
    qr, off = q.reshape(b * n, 1, hq, d), jnp.asarray(last, jnp.int32)
    want_sparse = np.asarray(infllm_v2_reference(qr, jnp.asarray(views_k), jnp.asarray(views_v), scfg, q_offset=off))
    want_dense = np.asarray(dense_causal_reference(qr, jnp.asarray(views_k), jnp.asarray(views_v), q_offset=off))
    got = tree_dense_attention(q, k, v, jnp.asarray(base), layout).reshape(b * n, 1, hq, d)
    np.testing.assert_allclose(got, want_dense, rtol=1e-5, atol=1e-5)
    cc = compressed_cache_from_keys(k, jnp.asarray(base), scfg)
    for impl in ("reference", "xla", "pallas"):
        got = tree_sparse_attention(q, k, v, jnp.asarray(base), cc, layout, scfg, impl).reshape(b * n, 1, hq, d)
        np.testing.assert_allclose(got, want_sparse, rtol=1e-5, atol=1e-5, err_msg=impl)
    assert np.abs(want_sparse - want_dense).max() > 1e-2                # selection dropped some blocks


# ------------------------------------------------------------------------------- one tree step against plain decoding
def test_tree_step_logits_and_compacted_cache(target):
    """One verification pass over a (2, 2, 1) tree whose greedy path is hidden at non-first children (so the kept
    path must move): every node's logits equal plain decoding's over prefix + its root path; after compaction
    the cache (keys, values, lengths, InfLLM v2 compressed keys) equals plain decoding's over the kept tokens."""
    cfg, params = target
    attention = "sparse"
    tree = Tree((2, 2, 1))
    lengths = np.array([86, 77], np.int32)                              # > dense_len, not multiples of 16
    prompts = prompts_of(lengths, seed=3)
    cap = 128
    padded = np.zeros((2, 96), np.int32)
    for r, p in enumerate(prompts):
        padded[r, :len(p)] = p

    def plain(r, tokens):
        """Row r prefilled and decoded one token at a time over `tokens`: (greedy choice after each, cache, the
        last logits [V])."""
        c1 = mc.init_cache(cfg, 1, cap, attention="sparse")
        logits, c1 = mc.prefill(params, cfg, jnp.asarray(padded[r:r + 1]), jnp.asarray(lengths[r:r + 1]), c1,
                                attention)
        picks = [int(jnp.argmax(logits[0]))]
        for tok in tokens:
            logits, c1 = mc.decode_step(params, cfg, jnp.asarray([[tok]]), c1, attention)
            logits = logits[:, 0]
            picks.append(int(jnp.argmax(logits[0])))
        return picks, c1, np.asarray(logits[0])

    greedy = np.zeros((2, 5), np.int32)                                 # plain greedy decoding, 5 tokens per row
    for r in range(2):
        toks = plain(r, [])[0]
        while len(toks) < 5:
            toks = plain(r, toks)[0]                                    # feeds greedy's tokens, appends the next
        greedy[r] = toks
    # the greedy path sits at non-first children: row 0 along nodes 0 -> 2 -> 6 -> 10 (3 kept), row 1 along
    # 0 -> 2 -> 5 (2 kept: node 5's child 9 is wrong); every other node of depth d carries greedy's token + 1, so
    # no child of a path node agrees except the planted one
    depth = tree.node_depth
    nodes = ((greedy[:, depth] + 1) % 300).astype(np.int32)
    nodes[:, 0] = greedy[:, 0]
    nodes[0, [2, 6, 10]] = greedy[0, 1:4]
    nodes[1, [2, 5]] = greedy[1, 1:3]
    cache = mc.init_cache(cfg, 2, cap, attention="sparse")
    _, cache = mc.prefill(params, cfg, jnp.asarray(padded), jnp.asarray(lengths), cache, attention)
    logits, _, tc = tree_verify_step(params, cfg, jnp.asarray(nodes), cache, tree, attention)
    n, last, nxt = accept_tree_greedy(logits, jnp.asarray(nodes), tree)
    assert np.asarray(n).tolist() == [3, 2] and np.asarray(last).tolist() == [10, 5]
    assert np.asarray(nxt).tolist() == [greedy[0, 4], greedy[1, 3]]

    # every node against plain decoding of prefix + its root path
    want = np.stack([plain(r, [int(nodes[r, j]) for j in tree.paths[i, :tree.node_depth[i] + 1]])[2]
                     for r in range(2) for i in range(tree.num_nodes)]).reshape(2, tree.num_nodes, -1)
    err = np.abs(np.asarray(logits) - want).max() / np.abs(want).max()
    print(f"tree step vs plain decoding ({attention}): max relative error {err:.2e}")
    assert err < 1e-5

    keep = jnp.asarray(lengths) + n + 1
    path = jnp.asarray(tree.paths)[last]
    got = compact_tree_cache(tc, cfg, path, keep)
    for r in range(2):                                                  # plain decoding, one row at a time
        _, c1, _ = plain(r, [int(nodes[r, j]) for j in tree.paths[int(last[r]), :int(n[r]) + 1]])
        m = int(keep[r])
        assert int(got.lengths[r]) == int(c1.lengths[0]) == m
        # (the tree's masked softmax sums in another order than a chain's: float32 noise reaches layer 2's keys)
        np.testing.assert_allclose(got.k[:, r, :m], c1.k[:, 0, :m], rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(got.v[:, r, :m], c1.v[:, 0, :m], rtol=1e-4, atol=2e-5)
        np.testing.assert_array_equal(got.sparse.count[:, r], c1.sparse.count[:, 0])
        for layer in range(cfg.num_hidden_layers):
            cnt = int(c1.sparse.count[layer, 0])
            np.testing.assert_allclose(got.sparse.kc[layer, r, :cnt], c1.sparse.kc[layer, 0, :cnt], rtol=1e-5,
                                       atol=1e-6)


# ------------------------------------------------------------------------ the sampling loop keeps p, end to end
def flatter(fr, n_gen, depth):
    """The random draft's own logits, flattened: its proposals then overlap the (flat) tiny target's often, so about
    half are kept and the residual rule matters (an untouched random draft is rejected ~90% of the time, where a
    wrong residual would hardly show)."""
    return fr * 0.2


@pytest.mark.parametrize("shape", [dict(k=2), dict(tree=(2, 2))])
def test_sampling_loop_keeps_the_target_distribution(shape):
    """4000 rows of one prompt, sampled at temperature 1 through the whole speculative loop (a random draft, made
    flatter, that is not the target: drafts are both kept and rejected; drawing from p instead of the residual after
    a rejection fails this test): the 2nd and 3rd emitted tokens (the first ones the loop
    itself verifies; the 1st comes from the prefill) follow the target's marginals, computed here from `forward`.
    Chi-square goodness of fit, cells with expected count < 5 pooled; fails below p = 1e-3 (a correct sampler fails
    one such test in a thousand)."""
    v, rows = 16, 4000
    cfg = mc.ModelConfig.tiny(num_hidden_layers=1, vocab_size=v, sparse_config=None, hidden_size=64,
                              intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)
    params = mc.init_params(cfg, jax.random.key(5))
    draft = init_draft(cfg, np.arange(v), jax.random.key(6))
    prompt = [3, 7, 1, 12]
    out = speculative_generate(params, cfg, draft, [prompt] * rows, 3, temperature=1.0, eos_token_id=[],
                               attention="dense", rng=jax.random.key(7), propose_fn=flatter, **shape)
    kept = np.bincount(out.accepted, minlength=3)
    assert kept[0] > rows // 5 and kept[1] > rows // 5 and kept[2] > 0   # drafts kept and rejected, often

    # the target's own probabilities: p(t1), p(t2 | t1), p(t3 | t1, t2) over all v^2 prefixes
    pairs = np.array([prompt + [a, b] for a in range(v) for b in range(v)], np.int32)
    p = np.asarray(jax.nn.softmax(mc.forward(params, cfg, jnp.asarray(pairs))[:, -3:], axis=-1), np.float64)
    p1 = p[0, 0]                                                        # at the prompt's last token: p(t1)
    p, p2_given = p[:, 1:], p[::v, 1]                                   # [v*v, 2, v]; [v (t1), v]: p(t2 | t1)
    joint12 = p1[:, None] * p2_given                                    # [t1, t2]
    marg2 = joint12.sum(0)
    marg3 = (joint12.reshape(-1, 1) * p[:, 1]).sum(0)                   # p(t3) = sum p(t1, t2) p(t3 | t1, t2)

    for col, want in ((1, marg2), (2, marg3)):
        counts = np.bincount(out.tokens[:, col], minlength=v).astype(np.float64)
        exp = want / want.sum() * rows
        big = exp >= 5
        obs_c = np.append(counts[big], counts[~big].sum())
        exp_c = np.append(exp[big], exp[~big].sum())
        if exp_c[-1] == 0:
            obs_c, exp_c = obs_c[:-1], exp_c[:-1]
        pval = stats.chisquare(obs_c, exp_c).pvalue
        print(f"{shape}: token {col + 1}: chi-square p = {pval:.3f} over {len(obs_c)} cells")
        assert pval > 1e-3, (col, counts, exp)
