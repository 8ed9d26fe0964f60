"""Log-likelihood of continuations, batched: what lm-eval's `loglikelihood` asks of a causal LM.

A request is (context ids, continuation ids). The model reads `(context + continuation)[:-1]`, left-truncated to
`max_length` tokens when it is longer (the oldest context tokens go first, as lm-eval's HF backend does), and the
continuation's log-probability is the sum over its tokens of log softmax(logits)[token] at the positions that
predict them. Only those positions reach the vocabulary head, so a 32K-token context costs one hidden state per
token but logits only for the continuation (in chunks of `HEAD_CHUNK` positions).

Rows are sorted by length and padded to a few bucketed shapes (`bucket`) so a task compiles a handful of programs.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.attention_plan import check_mode
from minicpm_jax.config import ModelConfig
from minicpm_jax.model import compute_logits, forward

HEAD_CHUNK = 256   # continuation positions per vocabulary-head call: bounds the [B, chunk, V] logits in memory


def bucket(n: int, multiple: int = 16) -> int:
    """`n` rounded up to one of ~4 sizes per octave (at most ~25 % padding), and to a multiple of `multiple`."""
    step = max(multiple, 2 ** max(n.bit_length() - 3, 0))
    step = -(-step // multiple) * multiple
    return -(-n // step) * step


def head_chunks(n: int) -> tuple[int, int]:
    """(padded continuation length C, chunk): C = n_chunks * chunk >= n, chunk <= HEAD_CHUNK, both bucketed."""
    c = bucket(n)
    n_chunks = -(-c // HEAD_CHUNK)
    chunk = -(-c // n_chunks // 16) * 16 if n_chunks > 1 else c
    return n_chunks * chunk, chunk


def truncate_request(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[list[int], int]:
    """(model input, index of the first input position that predicts a continuation token).

    The input is `(context + continuation)[:-1]` keeping its last `max_length` tokens. Raises ValueError for an
    empty context (nothing predicts the first continuation token) or a continuation longer than `max_length`."""
    if not context:
        raise ValueError("loglikelihood: the context is empty; give at least one token (lm-eval passes BOS)")
    if not continuation:
        raise ValueError("loglikelihood: the continuation is empty")
    if len(continuation) > max_length:
        raise ValueError(f"loglikelihood: a continuation of {len(continuation)} tokens does not fit the model's "
                         f"{max_length} positions")
    whole = list(context) + list(continuation)
    inp = whole[-(max_length + 1):][:-1]
    return inp, len(inp) - len(continuation)


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "chunk"))
def _score_batch(params, cfg: ModelConfig, tokens, lengths, cont_start, targets, attention: str, chunk: int):
    """Per-token log-probabilities of the continuations.

    Args:
      tokens: int32 [B, T] model inputs, right-padded; lengths: int32 [B] real lengths.
      cont_start: int32 [B] first position predicting a continuation token; targets: int32 [B, C] continuation ids
        (right-padded; C a multiple of `chunk`).
    Returns:
      (logprob float32 [B, C], greedy bool [B, C]: the target is the argmax) — padding positions are garbage.
    """
    hidden = forward(params, cfg, tokens, attention=attention, return_hidden=True, valid_lengths=lengths)
    b, c = targets.shape
    idx = jnp.minimum(cont_start[:, None] + jnp.arange(c, dtype=jnp.int32)[None], tokens.shape[1] - 1)
    h = jnp.take_along_axis(hidden, idx[:, :, None], axis=1)                       # [B, C, H]
    h = h.reshape(b, c // chunk, chunk, -1).swapaxes(0, 1)                         # [C/chunk, B, chunk, H]
    tg = targets.reshape(b, c // chunk, chunk).swapaxes(0, 1)

    def head(args):
        hc, tc = args
        logits = compute_logits(params, cfg, hc)                                   # float32 [B, chunk, V]
        lp = jax.nn.log_softmax(logits, axis=-1)
        return (jnp.take_along_axis(lp, tc[..., None], axis=-1)[..., 0],
                jnp.argmax(logits, axis=-1).astype(jnp.int32) == tc)

    lp, greedy = jax.lax.map(head, (h, tg))
    return lp.swapaxes(0, 1).reshape(b, c), greedy.swapaxes(0, 1).reshape(b, c)


def score_continuations(params, cfg: ModelConfig, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        attention: str = "auto", batch_size: int = 8, max_length: int | None = None,
                        pad_id: int = 0, progress=None) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, whether every continuation token is the greedy choice) per request, in order.

    Args:
      requests: (context ids, continuation ids) pairs; a context longer than fits is left-truncated.
      max_length: the model's window (default cfg.max_position_embeddings).
      progress: optional callable(n) told how many requests each batch finished (a tqdm's `update`).
    """
    check_mode(attention)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = max_length or cfg.max_position_embeddings
    if max_length > cfg.max_position_embeddings:
        raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings="
                         f"{cfg.max_position_embeddings}")
    rows = [truncate_request(ctx, cont, max_length) + (list(cont),) for ctx, cont in requests]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    multiple = 16 if cfg.sparse_config is None else math.lcm(16, cfg.sparse_config.block_size)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        t = min(bucket(len(rows[idx[0]][0]), multiple), max_length)     # the longest row comes first
        c, chunk = head_chunks(max(len(rows[i][2]) for i in idx))
        tokens = np.full((batch_size, t), pad_id, np.int32)
        targets = np.zeros((batch_size, c), np.int32)
        lengths = np.ones((batch_size,), np.int32)          # padding rows: one token, never read
        start = np.zeros((batch_size,), np.int32)
        for j, i in enumerate(idx):
            inp, cs, cont = rows[i]
            tokens[j, :len(inp)] = inp
            lengths[j], start[j] = len(inp), cs
            targets[j, :len(cont)] = cont
        lp, greedy = _score_batch(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(start),
                                  jnp.asarray(targets), attention, chunk)
        lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
        for j, i in enumerate(idx):
            n = len(rows[i][2])
            out[i] = (float(lp[j, :n].sum()), bool(greedy[j, :n].all()))
        if progress is not None:
            progress(len(idx))
    return out
