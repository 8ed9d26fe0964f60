"""μP rules: which tensors shrink their learning rate and init std as the model widens, and by how much.

With width multiplier m = hidden_size / dim_model_base (`ModelConfig.width_mult`):

- rule "hidden" (μP for Adam as in Tensor Programs V and the `mup` package): hidden matrices (attention and MLP
  kernels) train at peak_lr / m with init std initializer_range / sqrt(m); the embedding and the head keep
  peak_lr and initializer_range (the head's 1/m is the forward pass's `÷ width_mult` before it).
- rule "every_2d" (the other reading of MiniCPM-1's description): every 2-D tensor, embeddings and head included,
  trains at peak_lr / m with init std initializer_range / sqrt(m).

Norm weights keep peak_lr under both. The model's own init (`minicpm_jax.init_params`) already divides the hidden
matrices' std by sqrt(m) (that is where it lives: `layers.hidden_init_std`); the rule's extra factor for the
embedding and head is applied on top of it by the trainer (`init_multipliers`), so the model knows nothing of rules.
Standard parametrisation is `optim.mup=false` with `model.dim_model_base = hidden_size` (m = 1: every factor is 1).
"""

from __future__ import annotations

import math

import jax

from minicpm_jax.config import ModelConfig
from minicpm_jax.train.config import MUP_RULES


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def is_hidden_matrix(path) -> bool:
    """Attention / MLP kernels inside the layers (the tensors whose μP learning rate shrinks with width)."""
    names = _path_names(path)
    return "layers" in names and names[-1] == "kernel"


def is_embedding_or_head(path) -> bool:
    """The input embedding (also the head when tied) and an untied head."""
    return _path_names(path)[-1] in ("embed_tokens", "lm_head")


def scales_with_width(path, rule: str) -> bool:
    """Whether the tensor at `path` gets the 1/m learning rate (and 1/sqrt(m) init) under `rule`."""
    if rule not in MUP_RULES:
        raise ValueError(f"optim.mup_rule: must be one of {MUP_RULES}, got {rule!r}")
    return is_hidden_matrix(path) or (rule == "every_2d" and is_embedding_or_head(path))


def lr_multipliers(model_cfg: ModelConfig, params, mup: bool = True, rule: str = "hidden"):
    """Pytree like `params` of python floats: 1/width_mult where `rule` scales the tensor (when `mup`), else 1."""
    m = 1.0 / model_cfg.width_mult if mup else 1.0
    return jax.tree_util.tree_map_with_path(lambda p, _: m if scales_with_width(p, rule) else 1.0, params)


def init_multipliers(model_cfg: ModelConfig, params, mup: bool = True, rule: str = "hidden"):
    """Pytree like `params` of python floats: what the trainer multiplies the model's init by.

    1/sqrt(width_mult) for the embedding and head under "every_2d" (with `mup`); 1 everywhere else (the hidden
    matrices' 1/sqrt(width_mult) is already in the model's init).
    """
    s = 1.0 / math.sqrt(model_cfg.width_mult) if mup else 1.0
    return jax.tree_util.tree_map_with_path(
        lambda p, _: s if (rule == "every_2d" and is_embedding_or_head(p)) else 1.0, params)


def apply_init_multipliers(params, multipliers):
    """params (any float dtype, sharded or not) times the per-leaf floats; leaves with multiplier 1 are untouched."""
    return jax.tree.map(lambda x, m: x if m == 1.0 else (x * m).astype(x.dtype), params, multipliers)
