"""Accepting a verified draft tree: the kept root path plus one token from the target.

Greedy: the children of a node are the draft's top-b tokens there (distinct), so at most one child of a node
equals the target's argmax at the node; the agreeing nodes form one root path, kept whole. The output is exactly
greedy decoding of the target.

Sampling (recursive rejection over i.i.d. drafts, as in SpecInfer, Miao et al. 2024, and "multi-draft" speculative
sampling): the b children of a node are b independent draws from the draft's distribution q there. Starting from
the target's p at the root, with residual r = p: child c_i is accepted with probability min(1, r(c_i) / q(c_i));
then the walk moves to c_i and restarts with r = p at c_i. If c_i is rejected, r <- normalise(max(r - q, 0)) and
the next child is tried. When every child is rejected (or a leaf is reached) the next token is drawn from r.
Each step is the one-draft rule of `verify.accept_sampled` with its "residual" branch replaced by another try
against the residual with a fresh independent draft, so by induction the emitted token is distributed as p; a
kept child's subtree was drawn from q at that child independently of the tries above it, so the argument repeats
one level down. Every emitted token is therefore distributed exactly as sampling from the target.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minicpm_jax.speculative.tree import Tree


def accept_tree_greedy(target_logits: jnp.ndarray, node_tokens: jnp.ndarray, tree: Tree):
    """Greedy acceptance over a tree: the deepest node whose whole root path agrees with the target's argmax.

    target_logits [B, N, V] at the nodes; node_tokens int32 [B, N] (the root's included). A node agrees when its
    token equals the target's argmax at its parent. Returns (n_accepted int32 [B] = depth of the deepest agreeing
    path, last int32 [B] its node, next token int32 [B] = the target's argmax there)."""
    y = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)                          # [B, N]
    agree = (node_tokens == y[:, tree.parent]).at[:, 0].set(True)
    on_path = jnp.all(agree[:, None, :] | ~jnp.asarray(tree.ancestors)[None], axis=-1)   # every ancestor agrees
    depth = jnp.asarray(tree.node_depth)
    last = jnp.argmax(jnp.where(on_path, depth[None], -1), axis=1).astype(jnp.int32)
    return depth[last], last, jnp.take_along_axis(y, last[:, None], axis=1)[:, 0]


def accept_tree_sampled(p_logits: jnp.ndarray, q_logits: jnp.ndarray, node_tokens: jnp.ndarray, tree: Tree,
                        rng: jax.Array):
    """Recursive rejection sampling over a tree (module docstring).

    p_logits [B, N, V]: the target's sampling distribution at every node (already filtered, see
    sampling.filtered_logits); q_logits [B, N_int, V]: at each internal node (nodes 0 .. N_int-1, breadth first)
    the distribution its children were drawn from, independently (-inf where q is 0); node_tokens int32 [B, N].
    Returns (n_accepted int32 [B], last node int32 [B], next token int32 [B])."""
    b = node_tokens.shape[0]
    p = jax.nn.softmax(p_logits, axis=-1)
    q = jax.nn.softmax(q_logits, axis=-1)
    at = lambda x, i: jnp.take_along_axis(x, i[:, None, None], axis=1)[:, 0]          # x [B, N, V], i [B] -> [B, V]
    of = lambda x, tok: jnp.take_along_axis(x, tok[:, None], axis=1)[:, 0]            # x [B, V], tok [B] -> [B]
    node = jnp.zeros((b,), jnp.int32)
    alive = jnp.ones((b,), bool)                       # the walk has reached depth d - 1 and may go on
    r = p[:, 0]
    keys = jax.random.split(rng, sum(tree.branching) + 1)
    key_i = 0
    for depth, width in enumerate(tree.branching, start=1):
        first = tree.level_starts[depth] + (node - tree.level_starts[depth - 1]) * width   # the node's first child
        qn = at(q, node)
        moved, new_node = jnp.zeros((b,), bool), node
        for c in range(width):
            tok = jnp.take_along_axis(node_tokens, (first + c)[:, None], axis=1)[:, 0]
            u = jax.random.uniform(keys[key_i], (b,))
            key_i += 1
            trying = alive & ~moved
            ok = trying & (u * of(qn, tok) < of(r, tok))          # u < r/q without dividing by q
            new_node = jnp.where(ok, first + c, new_node)
            moved = moved | ok
            resid = jnp.maximum(r - qn, 0.0)
            total = resid.sum(-1, keepdims=True)
            # r == q leaves no residual mass; that rejection had probability 0, any fallback is right
            resid = jnp.where(total > 0, resid / jnp.maximum(total, 1e-30), r)
            r = jnp.where((trying & ~ok)[:, None], resid, r)
        r = jnp.where(moved[:, None], at(p, new_node), r)          # a kept child: start over from p there
        node, alive = new_node, moved
    nxt = jax.random.categorical(keys[key_i], jnp.log(r), axis=-1).astype(jnp.int32)
    return jnp.asarray(tree.node_depth)[node], node, nxt
