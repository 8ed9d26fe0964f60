"""minicpm-jax: MiniCPM4 in JAX/Flax.

    import minicpm_jax as mc
    cfg = mc.ModelConfig.tiny()
    params = mc.init_params(cfg, jax.random.key(0))
    logits = mc.forward(params, cfg, input_ids)
    out = mc.generate(params, cfg, [[1, 42, 7]], max_new_tokens=16)
    out = mc.generate(params, cfg, [[1, 42, 7]], max_new_tokens=16, draft=draft)   # speculative (EAGLE head)
    w = mc.load_weights("runs/tiny")     # a training run (or one --step of it) or an HF checkpoint directory
"""

import importlib

from minicpm_jax import sparse
from minicpm_jax.config import ModelConfig, RopeScaling
from minicpm_jax.convert.hf import load_hf, save_hf
from minicpm_jax.decode import GenerateResult, decode_step, prefill
from minicpm_jax.generation import generate
from minicpm_jax.kv_cache import KVCache, init_cache
from minicpm_jax.model import MiniCPM, abstract_params, compute_logits, forward, init_params, param_logical_axes
from minicpm_jax.sparse.config import SparseConfig



def __getattr__(name):
    # `mc.export` and `mc.load_weights` without importing gguf-py, orbax and grain on every `import minicpm_jax`
    if name == "export":
        return importlib.import_module("minicpm_jax.export")
    if name in ("load_weights", "Weights"):
        return getattr(importlib.import_module("minicpm_jax.weights"), name)
    raise AttributeError(f"module 'minicpm_jax' has no attribute {name!r}")


__all__ = [
    "ModelConfig", "RopeScaling", "SparseConfig", "MiniCPM", "init_params", "abstract_params", "param_logical_axes",
    "forward", "compute_logits", "generate", "GenerateResult", "prefill", "decode_step", "KVCache", "init_cache",
    "load_hf", "save_hf", "sparse", "export", "load_weights", "Weights",
]
