"""Speculative decoding with an EAGLE draft head: draft k tokens (a chain), verify them in one target pass over the
cached KV, keep the longest agreeing prefix plus one target token, roll both caches back past the rest.

Per row and step, with the target cache holding positions < L and `cur` (the last emitted token) at position L:
  1. the draft proposes d_1..d_k: d_1 from its output for the pair (F_{L-1}, cur), then one draft-layer step per
     further token on its own predicted features;
  2. the target runs [cur, d_1..d_k] at positions L..L+k in one cached step (dense or InfLLM v2), giving logits and
     features F_L..F_{L+k};
  3. `verify` keeps n drafted tokens and picks the next one (greedy: exactly the target's greedy tokens; sampling:
     exactly the target's distribution);
  4. the target cache is cut to L+n+1; the draft cache is cut to L and re-run on the true features
     (F_L..F_{L+n} paired with d_1..d_n, next), which also gives its first proposal for the next step.
Rows accept different n; finished rows stop changing. Everything runs in one jitted while loop.

With `tree=(b_1, .., b_D)` step 1 drafts a static tree instead (`speculative.tree`): b_1 children of cur, b_2 of
each of those, ..., the draft layer run once per depth over that depth's nodes (`draft.draft_tree_apply`); step 2
verifies all nodes in one pass with a tree mask (`tree_step.tree_verify_step`); step 3 keeps a root path
(`tree_accept`); step 4 compacts that path into contiguous target cache slots (`tree_step.compact_tree_cache`)
instead of cutting, and re-runs the draft on the path's true features as for a chain.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.attention_plan import check_mode
from minicpm_jax.config import ModelConfig
from minicpm_jax.decode import GenerateResult, decode_step_with_hidden, prefill_with_hidden, prepare_prompts
from minicpm_jax.kv_cache import init_cache, truncate_cache
from minicpm_jax.sampling import filtered_logits, sample_token
from minicpm_jax.speculative.draft import Draft, draft_apply, draft_tree_apply, fr_to_vocab, init_draft_cache
from minicpm_jax.speculative.tree import Tree
from minicpm_jax.speculative.tree_accept import accept_tree_greedy, accept_tree_sampled
from minicpm_jax.speculative.tree_step import compact_tree_cache, tree_verify_step
from minicpm_jax.unstacked import split_for_backend
from minicpm_jax.speculative.verify import accept_greedy, accept_sampled


@dataclasses.dataclass
class SpeculativeResult(GenerateResult):
    """GenerateResult plus, per row: target_passes (verification passes, the prefill not counted) and accepted
    (drafted tokens kept, summed over steps). Mean accepted length per step = (accepted + passes) / passes."""

    target_passes: np.ndarray = None
    accepted: np.ndarray = None


def _draft_tokens(fr_logits, fr_ids, vocab_size, rng, temperature):
    """One drafted token per row from FR logits [B, N]: argmax (greedy) or a sample at `temperature`; also the
    full-vocabulary logits of the distribution it was drawn from (for the acceptance ratio)."""
    q = fr_logits / jnp.maximum(temperature, 1e-6)
    pick = jnp.where(temperature > 0, jax.random.categorical(rng, q, axis=-1), jnp.argmax(fr_logits, axis=-1))
    return fr_ids[pick].astype(jnp.int32), fr_to_vocab(q, fr_ids, vocab_size)


def _chain_step(s, params, cfg, draft, embedding, k, temperature, top_k, top_p, attention, propose_fn):
    """Draft a chain of k tokens, verify [cur, d_1..d_k] in one pass, accept (greedy or sampled).

    Returns (drafted [B, k], n [B], next token [B], target features of cur, d_1..d_k [B, k+1, H], the target cache
    with the k+1 new slots written, roll(cache, keep) -> the cache cut to `keep`)."""
    rng, r_draft, r_acc = jax.random.split(s["rng"], 3)
    r_draft = jax.random.split(r_draft, k)
    dc = s["dcache"]
    fr_of = lambda fr, depth: fr if propose_fn is None else propose_fn(fr, s["n_gen"], depth)
    d, q = _draft_tokens(fr_of(s["d_fr"], 1), draft.fr_ids, cfg.vocab_size, r_draft[0], temperature)
    drafted, q_all, feat = [d], [q], s["d_feat"]
    for i in range(1, k):
        hi, fri, dc = draft_apply(draft, embedding, feat[:, None], drafted[-1][:, None], dc)
        feat = hi[:, 0]
        d, q = _draft_tokens(fr_of(fri[:, 0], i + 1), draft.fr_ids, cfg.vocab_size, r_draft[i], temperature)
        drafted.append(d)
        q_all.append(q)
    drafted = jnp.stack(drafted, axis=1)                                # [B, k]
    seq = jnp.concatenate([s["cur"][:, None], drafted], axis=1)
    logits, hid, tc = decode_step_with_hidden(params, cfg, seq, s["tcache"], attention)
    # one rule runs: the sampling rule sorts the vocabulary at every position
    n, nxt = jax.lax.cond(
        temperature <= 0, lambda: accept_greedy(logits, drafted),
        lambda: accept_sampled(filtered_logits(logits, temperature, top_k, top_p), jnp.stack(q_all, axis=1),
                               drafted, r_acc))
    return drafted, n, nxt, hid, tc, lambda c, keep: truncate_cache(c, cfg, keep), rng


def _tree_step(s, params, cfg, draft, embedding, tree: Tree, temperature, top_k, top_p, attention, propose_fn):
    """Draft a static tree level by level, verify all nodes in one pass, keep a root path (`tree_accept`).

    Children of a node: greedy, the draft's top-b FR tokens there (distinct); sampling, b independent draws from
    the draft's distribution at `temperature` (what the exact tree rejection rule needs). Returns what
    `_chain_step` does, with the kept path's drafted tokens [B, D] and features [B, D+1, H]."""
    b = s["cur"].shape[0]
    rng, r_draft, r_acc = jax.random.split(s["rng"], 3)
    r_draft = jax.random.split(r_draft, tree.depth)
    dc = s["dcache"]
    levels, fr, feat = [s["cur"][:, None]], s["d_fr"][:, None], s["d_feat"][:, None]   # [B, n_{d-1}, ...]
    q_all = []                                                        # per internal node, its children's q
    for depth, width in enumerate(tree.branching, start=1):
        if propose_fn is not None:
            fr = propose_fn(fr, s["n_gen"], depth)
        q = fr / jnp.maximum(temperature, 1e-6)
        drawn = jax.random.categorical(r_draft[depth - 1], q[:, :, None, :], axis=-1,
                                       shape=q.shape[:2] + (width,))
        pick = jnp.where(temperature > 0, drawn, jax.lax.top_k(fr, width)[1])        # [B, n_{d-1}, b_d]
        tokens = draft.fr_ids[pick].reshape(b, -1).astype(jnp.int32)
        levels.append(tokens)
        q_all.append(fr_to_vocab(q, draft.fr_ids, cfg.vocab_size))
        if depth < tree.depth:                       # the leaves' children are never drafted
            feats = jnp.repeat(feat, width, axis=1)  # a child pairs its parent's predicted feature with its token
            feat, fr, dc = draft_tree_apply(draft, embedding, feats, tokens, dc, tree.draft_layout(depth), depth)
    nodes = jnp.concatenate(levels, axis=1)                                            # [B, N]
    logits, hid, tc = tree_verify_step(params, cfg, nodes, s["tcache"], tree, attention)
    n, last, nxt = jax.lax.cond(
        temperature <= 0, lambda: accept_tree_greedy(logits, nodes, tree),
        lambda: accept_tree_sampled(filtered_logits(logits, temperature, top_k, top_p),
                                    jnp.concatenate(q_all, axis=1), nodes, tree, r_acc))
    path = jnp.asarray(tree.paths)[last]                                               # [B, D+1] node indices
    drafted = jnp.take_along_axis(nodes, path[:, 1:], axis=1)
    hid_path = jnp.take_along_axis(hid, path[:, :, None], axis=1)
    return drafted, n, nxt, hid_path, tc, lambda c, keep: compact_tree_cache(c, cfg, path, keep), rng


@functools.partial(jax.jit, static_argnames=("cfg", "draft_cfg", "k", "tree", "max_new_tokens", "capacity",
                                             "attention", "propose_fn"))
def _speculative(params, draft_params, fr_ids, embedding, tokens, lengths, rng, temperature, top_k, top_p, eos,
                 pad_id, *, cfg: ModelConfig, draft_cfg: ModelConfig, k: int, tree: Optional[Tree],
                 max_new_tokens: int, capacity: int, attention: str, propose_fn):
    b, t = tokens.shape
    params = split_for_backend(params)    # once per call, outside the loop (as decode.generate; XLA:CPU)
    draft = Draft(draft_params, fr_ids, draft_cfg)
    tcache = init_cache(cfg, b, capacity, attention)
    logits0, feats, tcache = prefill_with_hidden(params, cfg, tokens, lengths, tcache, attention)
    rng, sub = jax.random.split(rng)
    cur = sample_token(logits0, sub, temperature, top_k, top_p)

    # draft prefill: pairs (F_j, token_{j+1}) for j < length, the last one (F_{len-1}, cur)
    nxt = jnp.concatenate([tokens[:, 1:], jnp.full((b, 1), pad_id, jnp.int32)], axis=1)
    nxt = jnp.where(jnp.arange(t)[None] == (lengths - 1)[:, None], cur[:, None], nxt)
    dcache = init_draft_cache(draft, b, capacity)
    h, fr, dcache = draft_apply(draft, embedding, feats, nxt, dcache)
    dcache = truncate_cache(dcache, draft_cfg, lengths)
    d_feat = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    d_fr = jnp.take_along_axis(fr, (lengths - 1)[:, None, None], axis=1)[:, 0]

    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(cur)
    n_gen = jnp.ones((b,), jnp.int32)
    hit_eos = jnp.isin(cur, eos)
    done = hit_eos | (max_new_tokens <= 1)
    zeros = jnp.zeros((b,), jnp.int32)
    span = k if tree is None else tree.depth                            # drafted tokens on one path

    def cond(s):
        return ~jnp.all(s["done"])

    def body(s):
        active = ~s["done"]
        base = s["tcache"].lengths                                          # L: cur sits at position L
        # 1-3. draft, verify in one target pass, accept n drafted tokens and pick the next one
        if tree is None:
            drafted, n, nxt_tok, hid, tc, roll, rng = _chain_step(s, params, cfg, draft, embedding, k, temperature,
                                                                  top_k, top_p, attention, propose_fn)
        else:
            drafted, n, nxt_tok, hid, tc, roll, rng = _tree_step(s, params, cfg, draft, embedding, tree, temperature,
                                                                 top_k, top_p, attention, propose_fn)
        # emitted this step: d_1..d_n, next; cut at the first EOS and at max_new_tokens
        new = jnp.where(jnp.arange(span + 1)[None] < n[:, None],
                        jnp.concatenate([drafted, drafted[:, :1]], axis=1), nxt_tok[:, None])
        is_eos = jnp.isin(new, eos) & (jnp.arange(span + 1)[None] <= n[:, None])
        first_eos = jnp.where(is_eos.any(1), jnp.argmax(is_eos, axis=1), span + 1)
        count = jnp.minimum(jnp.minimum(n + 1, first_eos + 1), max_new_tokens - s["n_gen"])
        count = jnp.where(active, count, 0)
        slot = s["n_gen"][:, None] + jnp.arange(span + 1)[None]
        slot = jnp.where(jnp.arange(span + 1)[None] < count[:, None], slot, max_new_tokens)   # past the end: dropped
        out_ = s["out"].at[jnp.arange(b)[:, None], slot].set(new, mode="drop")
        n_gen = s["n_gen"] + count
        hit_eos = s["hit_eos"] | (active & (first_eos < count))
        done = s["done"] | hit_eos | (n_gen >= max_new_tokens)
        # 4. roll back: the target keeps cur and d_1..d_n; the draft is re-run on the true features
        keep = jnp.where(active, base + n + 1, base)
        tc = roll(tc, keep)
        dc = truncate_cache(s["dcache"], draft_cfg, base)
        pair_ids = jnp.where(jnp.arange(span + 1)[None] < n[:, None], new, nxt_tok[:, None])
        h, fr, dc = draft_apply(draft, embedding, hid, pair_ids, dc)
        dc = truncate_cache(dc, draft_cfg, keep)
        pick = lambda x: jnp.take_along_axis(x, n[:, None, None], axis=1)[:, 0]
        keep_old = lambda old, new_: jnp.where(active[:, None], new_, old)
        return dict(rng=rng, tcache=tc, dcache=dc, cur=jnp.where(active, nxt_tok, s["cur"]),
                    d_feat=keep_old(s["d_feat"], pick(h)), d_fr=keep_old(s["d_fr"], pick(fr)), out=out_,
                    n_gen=n_gen, done=done, hit_eos=hit_eos, passes=s["passes"] + active.astype(jnp.int32),
                    accepted=s["accepted"] + jnp.where(active, jnp.minimum(n, count), 0))

    s = dict(rng=rng, tcache=tcache, dcache=dcache, cur=cur, d_feat=d_feat, d_fr=d_fr, out=out, n_gen=n_gen,
             done=done, hit_eos=hit_eos, passes=zeros, accepted=zeros)
    s = jax.lax.while_loop(cond, body, s)
    return s["out"], s["n_gen"], s["hit_eos"], s["passes"], s["accepted"]


def speculative_generate(params, cfg: ModelConfig, draft: Draft, prompt_ids, max_new_tokens: int = 32, *, k: int = 4,
                         tree: Optional[Sequence[int]] = None, temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, rng: Optional[jax.Array] = None,
                         eos_token_id: Optional[Sequence[int] | int] = None, pad_id: Optional[int] = None,
                         attention: str = "auto", propose_fn: Optional[Callable] = None) -> SpeculativeResult:
    """`generate` with a draft head proposing tokens verified by one target pass per step (arguments as in
    `generate`).

    k: the draft proposes a chain of k tokens per step (at most k + 1 tokens emitted per target pass).
    tree: instead of a chain, a static draft tree (b_1, .., b_D) (EAGLE-2 style, `speculative.tree`): b_1 children
      of the last token (the draft's top-b_1 FR tokens), each expanded to its top-b_2, ...; all 1 + b_1 + b_1 b_2 +
      .. nodes are verified in one target pass with a tree attention mask (dense or InfLLM v2) and the deepest
      agreeing root path is kept (at most D + 1 tokens per pass); k is then unused. With temperature > 0 the
      children of a node are instead b independent draws from the draft's distribution and the path is kept by
      recursive rejection sampling (`speculative.tree_accept`), which keeps the target's distribution exactly.
    propose_fn: a seam for tests and analysis, (fr_logits [B, .., N] float32, n_gen int32 [B] tokens emitted
      before this step, depth) -> the FR logits the drafted tokens at `depth` (1 = the token after the last emitted
      one) are chosen from, in place of the draft's; e.g. an oracle that knows the target's continuation. It must
      be hashable (it is a static jit argument); None = the draft's own logits.

    Greedy (temperature 0) returns exactly the tokens of `generate`; with sampling every token is distributed as
    `generate`'s (same temperature / top-k / top-p), though not the same draws for a given rng."""
    check_mode(attention)
    if k < 1:
        raise ValueError(f"speculative decoding needs k >= 1 drafted tokens per step, got {k}")
    if draft.cfg.hidden_size != cfg.hidden_size:
        raise ValueError(f"the draft head was built for hidden size {draft.cfg.hidden_size}, the target has "
                         f"{cfg.hidden_size}")
    topo = None
    if tree is not None:
        topo = Tree(tuple(int(x) for x in tree) if isinstance(tree, (list, tuple)) else tree)
        if max(topo.branching) > draft.fr_ids.shape[0]:
            raise ValueError(f"tree={tuple(tree)} asks for {max(topo.branching)} children of a node but the draft "
                             f"scores only {draft.fr_ids.shape[0]} FR-Spec ids")
    ahead = k + 1 if topo is None else topo.num_nodes                # slots a step writes past the cache length
    prep = prepare_prompts(cfg, prompt_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_id,
                           extra_capacity=ahead)
    rng = jax.random.key(0) if rng is None else rng
    out, n_gen, done, passes, accepted = _speculative(
        params, draft.params, draft.fr_ids, params["embed_tokens"], prep.tokens, prep.lengths, rng,
        jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), prep.eos, prep.pad, cfg=cfg,
        draft_cfg=draft.cfg, k=int(k), tree=topo, max_new_tokens=max_new_tokens, capacity=prep.capacity,
        attention=attention, propose_fn=propose_fn)
    return SpeculativeResult(tokens=np.asarray(out), lengths=np.asarray(n_gen), finished=np.asarray(done),
                             target_passes=np.asarray(passes), accepted=np.asarray(accepted))
