"""Next-token cross-entropy over packed rows.

Token t predicts token t+1 only inside one document: the target counts iff `segment_ids[t] == segment_ids[t+1]`,
`segment_ids[t+1] != 0` (not padding) and `loss_mask[t+1]` (SFT: assistant tokens only). The head is applied in
chunks of tokens under `jax.checkpoint`, so the float32 [tokens, vocab] logits never exist at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from minicpm_jax.config import ModelConfig
from minicpm_jax.attention_plan import plan_attention
from minicpm_jax.model import compute_logits, forward


def target_mask(batch) -> jnp.ndarray:
    """bool [B, T-1]: which next-token targets count."""
    seg = batch["segment_ids"]
    ok = (seg[:, :-1] == seg[:, 1:]) & (seg[:, 1:] != 0)
    if "loss_mask" in batch:
        ok &= batch["loss_mask"][:, 1:].astype(bool)
    return ok


def chunked_cross_entropy(params, cfg: ModelConfig, hidden: jnp.ndarray, targets: jnp.ndarray, mask: jnp.ndarray,
                          chunk: int):
    """Sum of -log p(target) over masked positions, and the count. hidden [B, T, H]; targets/mask [B, T]."""
    b, t, h = hidden.shape
    n = -(-t // chunk)
    pad = n * chunk - t
    hp = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, h).swapaxes(0, 1)
    tp = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)
    mp = jnp.pad(mask, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(carry, xs):
        hc, tc, mc = xs
        logits = compute_logits(params, cfg, hc)                          # float32 [B, C, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
        return carry + jnp.sum(jnp.where(mc, lse - tgt, 0.0)), None

    total, _ = jax.lax.scan(one, jnp.float32(0.0), (hp, tp, mp))
    return total, jnp.sum(mask).astype(jnp.float32)


def row_lengths(batch) -> jnp.ndarray:
    """int32 [B]: each row's true length, its tokens before the padding (segment id 0). Rows on the sparse path hold
    one document followed by padding, so this is the length of that document (0 for an empty row)."""
    return jnp.sum(batch["segment_ids"] != 0, axis=1).astype(jnp.int32)


def dense_rows(cfg: ModelConfig, batch, *, attention: str = "auto") -> jnp.ndarray:
    """int32 scalar: how many rows of `batch` take dense attention (the rest take InfLLM v2), as `loss_sum_and_count`
    decides it. For the FLOP count of a step whose rows choose on their own."""
    b, t = batch["input_ids"].shape
    plan = plan_attention(cfg, attention, t)
    if not plan.sparse:
        return jnp.int32(b)
    if not plan.per_row:
        return jnp.int32(0)
    return jnp.sum(row_lengths(batch) < cfg.sparse_config.dense_len).astype(jnp.int32)


def loss_sum_and_count(params, cfg: ModelConfig, batch, *, attention: str = "auto", chunk: int = 2048):
    """(sum of token losses, number of target tokens) for one packed batch.

    batch: dict with int32 [B, T] `input_ids`, `segment_ids`, `positions` and optionally `loss_mask`.
    On the sparse path rows must hold one document each (checked on the host by the trainer, see
    `attention_plan.check_one_document_per_row`); the model then runs without segment ids (trailing padding is
    causal-invisible) and with each row's true length, so under "auto" a short row padded past `dense_len` runs
    dense and a long one InfLLM v2, as MiniCPM decides per sequence (HF: `kv_seq_len < dense_len`).
    """
    plan = plan_attention(cfg, attention, batch["input_ids"].shape[1])
    lengths = row_lengths(batch) if plan.per_row else None
    hidden = forward(params, cfg, batch["input_ids"], batch["positions"],
                     None if plan.sparse else batch["segment_ids"], attention=attention, return_hidden=True,
                     valid_lengths=lengths)
    mask = target_mask(batch)
    return chunked_cross_entropy(params, cfg, hidden[:, :-1], batch["input_ids"][:, 1:], mask,
                                 min(chunk, hidden.shape[1]))
