"""The EAGLE draft head's training loss on a frozen target (spec §5.2; EAGLE, Li et al. 2024).

For a packed batch the target runs once (no gradient) and gives its final features F [B, T, H]. The draft reads
the pairs (F_j, token_{j+1}) at positions j and is trained on two terms per pair whose next position j+1 is a real
token of the same document:
  * feature regression: smooth-L1(draft feature_j, F_{j+1}), averaged over the hidden size (what the draft feeds
    back into itself when it drafts several tokens);
  * token loss: cross-entropy of the draft's FR-Spec logits against the target's own next-token distribution at
    j+1 restricted to the FR ids (soft labels: verification accepts what the target would pick, not what the text
    says).
loss = feature_weight * regression + token_weight * token loss (EAGLE: 1.0 and 0.1), summed over pairs and
divided by their number by the caller (as the model's loss is).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from minicpm_jax.config import ModelConfig
from minicpm_jax.model import forward, head_logits
from minicpm_jax.speculative.draft import EagleDraft
from minicpm_jax.train.loss import target_mask
from minicpm_jax.train.step import TrainState


def smooth_l1(x: jnp.ndarray, y: jnp.ndarray, beta: float = 1.0) -> jnp.ndarray:
    """Huber-style smooth L1 per element (0.5 d^2 / beta below beta, |d| - beta/2 above), averaged over the last
    axis: [..., H] -> [...]."""
    d = jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))
    return jnp.mean(jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta), axis=-1)


def soft_cross_entropy(logits: jnp.ndarray, target_logits: jnp.ndarray) -> jnp.ndarray:
    """-sum_i softmax(target)_i log softmax(logits)_i over the last axis: [..., N] -> [...]."""
    return -jnp.sum(jax.nn.softmax(target_logits, axis=-1) * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def target_fr_logits(params, cfg: ModelConfig, hidden: jnp.ndarray, fr_ids: jnp.ndarray) -> jnp.ndarray:
    """The target's logits over the FR ids only, [..., N] float32 (a head of N columns, not V)."""
    lm_head = None if cfg.tie_word_embeddings else params["lm_head"][:, fr_ids]
    emb = params["embed_tokens"][fr_ids] if cfg.tie_word_embeddings else params["embed_tokens"]
    return head_logits(cfg, emb, lm_head, hidden)


def draft_loss_sum(draft_params, target_params, cfg: ModelConfig, draft_cfg: ModelConfig, fr_ids: jnp.ndarray,
                   batch, *, feature_weight: float = 1.0, token_weight: float = 0.1, target_attention: str = "dense"):
    """(summed loss, pair count, aux sums) for one packed batch (int32 [B, T] input_ids, segment_ids, positions).

    target_attention: the target's attention for its features ("dense" reads packed rows; "sparse"/"auto" need one
    document per row, as in training the target itself).

    aux: {"feature_loss", "token_loss", "fr_top1"} summed over the counted pairs; fr_top1 counts pairs where the
    draft's top FR id equals the target's top id among the FR ids (a proxy for first-token acceptance)."""
    ids, seg, pos = batch["input_ids"], batch["segment_ids"], batch["positions"]
    feats = jax.lax.stop_gradient(forward(target_params, cfg, ids, pos, seg, attention=target_attention,
                                          return_hidden=True))
    h, fr_logits, _ = EagleDraft(draft_cfg, int(fr_ids.shape[0])).apply(
        {"params": draft_params}, feats[:, :-1], ids[:, 1:], target_params["embed_tokens"], pos[:, :-1],
        segment_ids=seg[:, :-1])
    want = jax.lax.stop_gradient(target_fr_logits(target_params, cfg, feats[:, 1:], fr_ids))
    mask = target_mask({"segment_ids": seg}).astype(jnp.float32)          # [B, T-1]: j+1 in j's document
    feat_l = smooth_l1(h, feats[:, 1:])
    tok_l = soft_cross_entropy(fr_logits, want)
    top1 = (jnp.argmax(fr_logits, -1) == jnp.argmax(want, -1)).astype(jnp.float32)
    total = jnp.sum(mask * (feature_weight * feat_l + token_weight * tok_l))
    aux = {"feature_loss": jnp.sum(mask * feat_l), "token_loss": jnp.sum(mask * tok_l),
           "fr_top1": jnp.sum(mask * top1)}
    return total, jnp.sum(mask), aux


def make_draft_train_step(cfg: ModelConfig, draft_cfg: ModelConfig, fr_ids: jnp.ndarray, tx, *,
                          feature_weight: float = 1.0, token_weight: float = 0.1, target_attention: str = "dense",
                          schedule=None):
    """train_step(state, target_params, batch) -> (state, metrics) for the draft's TrainState (params = the draft's
    only; the target is an input, never updated). Metrics are per pair: loss, feature_loss, token_loss, fr_top1,
    grad_norm, pairs, and lr when `schedule` (step -> learning rate) is given."""
    def loss_fn(dp, tp, batch):
        total, n, aux = draft_loss_sum(dp, tp, cfg, draft_cfg, fr_ids, batch, feature_weight=feature_weight,
                                       token_weight=token_weight, target_attention=target_attention)
        return total / jnp.maximum(n, 1.0), (n, aux)

    def train_step(state, target_params, batch):
        (loss, (n, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, target_params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "pairs": n,
                   **{k: v / jnp.maximum(n, 1.0) for k, v in aux.items()}}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_draft_eval_step(cfg: ModelConfig, draft_cfg: ModelConfig, fr_ids: jnp.ndarray, *, feature_weight: float = 1.0,
                         token_weight: float = 0.1, target_attention: str = "dense"):
    """eval_step(draft_params, target_params, batch) -> {"loss_sum", "target_tokens" (pairs), "feature_loss_sum",
    "token_loss_sum", "fr_top1_sum"}: the held-out draft loss in the form the training loop's eval sums."""
    def eval_step(dp, tp, batch):
        total, n, aux = draft_loss_sum(dp, tp, cfg, draft_cfg, fr_ids, batch, feature_weight=feature_weight,
                                       token_weight=token_weight, target_attention=target_attention)
        return {"loss_sum": total, "target_tokens": n, **{f"{k}_sum": v for k, v in aux.items()}}

    return eval_step
