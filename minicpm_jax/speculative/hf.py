"""A draft head as an HF-style directory, in the tensor layout CPM.cu loads for MiniCPM4 EAGLE heads.

    config.json          the draft layer's shapes and μP scalars (equal to the target's, which CPM.cu asserts),
                         num_hidden_layers 1, draft_vocab_size N, and how this head was built (`minicpm_jax`)
    model.safetensors    fc.weight [H, 2H] (input = [RMSNorm1(embedding), RMSNorm2(feature)]), fc.bias [H],
                         input_norm1.weight, input_norm2.weight, layers.0.* (MiniCPM layer names)
    frspec.safetensors   token_id_remap int32 [N] (the FR-Spec ids) and lm_head.weight [N, H] (the FR head)

Limits (CPM.cu `cpmcu/speculative/eagle.py`, `src/model/minicpm4/minicpm4_eagle.cuh` @23aa7b7): CPM.cu builds the
draft's output layer from the *target's* lm_head at token_id_remap, so a trained FR head reaches it only if it was
kept equal to the target's rows; it applies RoPE in the draft layer only with --use-rope, while this head always
does; the input norms need --use-input-norm. The files are written atomically (a temporary directory renamed).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from minicpm_jax.config import ModelConfig
from minicpm_jax.convert.hf import replace_dir, tensor_specs, to_host
from minicpm_jax.speculative.draft import Draft, draft_layer_config

FORMAT = "minicpm_jax.eagle2_frspec.v1"


def _layer_specs(cfg: ModelConfig):
    """(file name, path inside params["layer"], spec) for the one draft layer."""
    for spec in tensor_specs(cfg):
        if spec.layered:
            yield spec.hf_name.replace("model.layers.{i}.", "layers.0."), spec.path[1:], spec


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def save_draft_hf(path, draft: Draft, target: ModelConfig) -> Path:
    """Write `draft` (built for `target`) under `path`, replacing an older directory only once complete."""
    path = Path(path)
    p = draft.params
    host = lambda x: to_host(x).astype(np.float32)
    tensors = {"fc.weight": np.ascontiguousarray(host(p["fc"]["kernel"]).T), "fc.bias": host(p["fc"]["bias"]),
               "input_norm1.weight": host(p["embed_norm"]["weight"]),
               "input_norm2.weight": host(p["hidden_norm"]["weight"])}
    for name, sub, spec in _layer_specs(draft.cfg):
        tensors[name] = spec.to_hf(host(_get(p["layer"], sub)))
    frspec = {"token_id_remap": np.asarray(draft.fr_ids, np.int32),
              "lm_head.weight": np.ascontiguousarray(host(p["fr_head"]).T)}
    c = draft.cfg
    config = {
        "architectures": ["MiniCPMEagle"], "model_type": "minicpm", "num_hidden_layers": 1,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim, "rms_norm_eps": c.rms_norm_eps, "vocab_size": target.vocab_size,
        "scale_depth": target.scale_depth, "dim_model_base": target.dim_model_base, "scale_emb": target.scale_emb,
        "draft_vocab_size": int(draft.fr_ids.shape[0]), "torch_dtype": "float32",
        "minicpm_jax": {"format": FORMAT, "fc_bias": True, "input_norm": True, "rope": True,
                        "target_num_hidden_layers": target.num_hidden_layers},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_file(frspec, str(tmp / "frspec.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_draft_hf(path, target: ModelConfig) -> Draft:
    """Read a directory written by `save_draft_hf` for `target`; ValueError names a mismatched field or tensor."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file}: no draft head config (expected a directory written by save_draft_hf)")
    config = json.loads(cfg_file.read_text())
    if config.get("minicpm_jax", {}).get("format") != FORMAT:
        raise ValueError(f"{cfg_file}: not a {FORMAT} draft head (minicpm_jax.format = "
                         f"{config.get('minicpm_jax', {}).get('format')!r})")
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                  "scale_depth", "dim_model_base", "scale_emb"):
        want = getattr(target, field)
        if config.get(field) != want:
            raise ValueError(f"{cfg_file}: {field} is {config.get(field)!r} but the target model has {want!r}")
    if config["minicpm_jax"].get("target_num_hidden_layers") != target.num_hidden_layers:
        raise ValueError(f"{cfg_file}: the head was built for a {config['minicpm_jax'].get('target_num_hidden_layers')}"
                         f"-layer target (its residual scale depends on it), the target has {target.num_hidden_layers}")
    cfg = draft_layer_config(target)
    t = load_file(str(path / "model.safetensors"))
    fr = load_file(str(path / "frspec.safetensors"))
    h = cfg.hidden_size
    need = {"fc.weight": (h, 2 * h), "fc.bias": (h,), "input_norm1.weight": (h,), "input_norm2.weight": (h,)}
    need.update({name: spec.hf_shape for name, _, spec in _layer_specs(cfg)})
    for name, shape in need.items():
        if name not in t:
            raise ValueError(f"{path / 'model.safetensors'}: tensor {name} is missing")
        if tuple(t[name].shape) != tuple(shape):
            raise ValueError(f"{path / 'model.safetensors'}: tensor {name} has shape {t[name].shape}, expected {shape}")
    ids = np.asarray(fr["token_id_remap"], np.int32)
    if fr["lm_head.weight"].shape != (ids.size, h):
        raise ValueError(f"{path / 'frspec.safetensors'}: lm_head.weight has shape {fr['lm_head.weight'].shape}, "
                         f"expected {(ids.size, h)}")
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    layer: dict = {}
    for name, sub, spec in _layer_specs(cfg):
        node = layer
        for k in sub[:-1]:
            node = node.setdefault(k, {})
        node[sub[-1]] = f32(spec.to_ours(t[name]))
    params = {"fc": {"kernel": f32(t["fc.weight"].T), "bias": f32(t["fc.bias"])},
              "embed_norm": {"weight": f32(t["input_norm1.weight"])},
              "hidden_norm": {"weight": f32(t["input_norm2.weight"])},
              "layer": layer, "fr_head": f32(fr["lm_head.weight"].T)}
    return Draft(params, jnp.asarray(ids), cfg)
