"""AdamW with the WSD schedule and μP per-tensor learning rates (optax).

WSD (warmup-stable-decay, MiniCPM): linear warmup from init_lr to peak over `warmup_steps`, constant peak, then the
last `decay_steps` of the run anneal to `final_lr_ratio * peak` with a linear, cosine or exponential shape. The
schedule is a pure function of the step, so a resumed run continues it exactly; a new phase (annealing from a
stable checkpoint, long-context extension) is a new run with `train.init_from` and its own schedule, with fresh Adam
moments or (`train.init_from_optimizer`) the source run's (`minicpm_jax.train.phase.continue_optimizer`).

μP per-tensor learning rates (`minicpm_jax.train.mup`, chosen by `optim.mup_rule`): with width multiplier
m = hidden_size / dim_model_base, hidden matrices train at peak_lr / m ("hidden", the default) or every 2-D tensor
does ("every_2d"); norms always at peak_lr. Decoupled weight decay is multiplied by each tensor's learning rate, as
in AdamW.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from minicpm_jax.config import ModelConfig
from minicpm_jax.train.config import OptimConfig
from minicpm_jax.train.mup import is_embedding_or_head, is_hidden_matrix, lr_multipliers


def wsd_schedule(cfg: OptimConfig, total_steps: int):
    """lr(step) for the whole run; `step` may be a traced int."""
    peak, warm, decay = cfg.peak_lr, cfg.warmup_steps, cfg.decay_steps
    decay_start = total_steps - decay
    init, final = cfg.init_lr_ratio, cfg.final_lr_ratio

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm_lr = peak * (init + (1.0 - init) * s / max(warm, 1))
        frac = jnp.clip((s - decay_start) / max(decay, 1), 0.0, 1.0)
        if cfg.decay_shape == "linear":
            dec = 1.0 - (1.0 - final) * frac
        elif cfg.decay_shape == "cosine":
            dec = final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
        else:                                        # exponential: geometric interpolation peak -> final * peak
            dec = jnp.power(final, frac)
        lr = jnp.where(s < warm, warm_lr, peak)
        return jnp.where((decay > 0) & (s >= decay_start), peak * dec, lr)

    return schedule


def weight_decay_mask(params, decay_embeddings: bool = False):
    """True for tensors that get weight decay: hidden matrices, plus embeddings/head if asked; never norms."""
    def decide(path, _):
        return is_hidden_matrix(path) or (decay_embeddings and is_embedding_or_head(path))
    return jax.tree_util.tree_map_with_path(decide, params)


class ScaleByTreeState(NamedTuple):
    pass


def scale_by_tree(multipliers) -> optax.GradientTransformation:
    """Multiply each update leaf by a fixed per-leaf float (the μP learning-rate multipliers)."""
    def init(params):
        return ScaleByTreeState()

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig, model_cfg: ModelConfig, params, total_steps: int):
    """(optax transformation, schedule). Works on fp32 master params whatever the compute dtype."""
    schedule = wsd_schedule(cfg, total_steps)
    parts: list[Any] = []
    if cfg.clip_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    parts += [
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=weight_decay_mask(params, cfg.decay_embeddings)),
        scale_by_tree(lr_multipliers(model_cfg, params, cfg.mup, cfg.mup_rule)),
        optax.scale_by_learning_rate(schedule),
    ]
    return optax.chain(*parts), schedule
