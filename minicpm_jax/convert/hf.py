"""Hugging Face MiniCPM checkpoints: `config.json` + `*.safetensors` (single file or sharded with an index).

Tensor names are MiniCPM's own (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...).
HF stores linear weights torch-style `[out, in]`; our kernels are `[in, out]` with heads split out and layers
stacked on a leading axis, so every tensor has a pair of exact (bit-preserving) transforms below.

Loading reads every header first (a missing, extra or mis-shaped tensor is an error naming it and the expected
shape), then builds each parameter with `jax.make_array_from_callback`: every device reads only the layers it holds,
cast straight to the requested dtype, so an 8B bf16 checkpoint never sits in memory twice. Saving writes into a
temporary directory that replaces the target only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from minicpm_jax.config import ModelConfig
from minicpm_jax.model import abstract_params, param_logical_axes
from minicpm_jax.sharding import LOGICAL_RULES, logical_shardings

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One HF tensor family <-> one parameter leaf. `layered` tensors exist once per layer ({i} in the name)."""

    hf_name: str                      # may contain {i}
    path: tuple[str, ...]             # path in our params dict
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    layered: bool = False

    def names(self, num_layers: int) -> list[str]:
        return [self.hf_name.format(i=i) for i in range(num_layers)] if self.layered else [self.hf_name]


def tensor_specs(cfg: ModelConfig) -> list[TensorSpec]:
    """The HF <-> params mapping for this config, in checkpoint order."""
    h, f, v, d = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    ident = lambda w: w
    T = lambda w: np.ascontiguousarray(w.T)

    def in_proj(heads):   # HF [heads*D, H] <-> ours [H, heads, D]
        return (lambda w: np.ascontiguousarray(w.T).reshape(h, heads, d),
                lambda k: np.ascontiguousarray(k.reshape(h, heads * d).T))

    q_in, q_out = in_proj(hq)
    kv_in, kv_out = in_proj(hkv)
    o_in = lambda w: np.ascontiguousarray(w.T).reshape(hq, d, h)            # HF [H, hq*D] -> [hq, D, H]
    o_out = lambda k: np.ascontiguousarray(k.reshape(hq * d, h).T)
    L = "model.layers.{i}."
    specs = [TensorSpec("model.embed_tokens.weight", ("embed_tokens",), (v, h), ident, ident)]
    specs += [
        TensorSpec(L + "input_layernorm.weight", ("layers", "input_layernorm", "weight"), (h,), ident, ident, True),
        TensorSpec(L + "self_attn.q_proj.weight", ("layers", "self_attn", "q_proj", "kernel"), (hq * d, h), q_in,
                   q_out, True),
        TensorSpec(L + "self_attn.k_proj.weight", ("layers", "self_attn", "k_proj", "kernel"), (hkv * d, h), kv_in,
                   kv_out, True),
        TensorSpec(L + "self_attn.v_proj.weight", ("layers", "self_attn", "v_proj", "kernel"), (hkv * d, h), kv_in,
                   kv_out, True),
        TensorSpec(L + "self_attn.o_proj.weight", ("layers", "self_attn", "o_proj", "kernel"), (h, hq * d), o_in,
                   o_out, True),
        TensorSpec(L + "post_attention_layernorm.weight", ("layers", "post_attention_layernorm", "weight"), (h,),
                   ident, ident, True),
        TensorSpec(L + "mlp.gate_proj.weight", ("layers", "mlp", "gate_proj", "kernel"), (f, h), T, T, True),
        TensorSpec(L + "mlp.up_proj.weight", ("layers", "mlp", "up_proj", "kernel"), (f, h), T, T, True),
        TensorSpec(L + "mlp.down_proj.weight", ("layers", "mlp", "down_proj", "kernel"), (h, f), T, T, True),
    ]
    specs.append(TensorSpec("model.norm.weight", ("norm", "weight"), (h,), ident, ident))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head",), (v, h), T, T))
    return specs


# ----------------------------------------------------------------------------------------------- in-memory form
def params_to_hf_tensors(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """All HF tensors as numpy arrays (host memory; use `save_hf` for large models)."""
    out = {}
    for spec in tensor_specs(cfg):
        leaf = to_host(_get(params, spec.path))
        if spec.layered:
            for i, name in enumerate(spec.names(cfg.num_hidden_layers)):
                out[name] = spec.to_hf(leaf[i])
        else:
            out[spec.hf_name] = spec.to_hf(leaf)
    return out


def hf_tensors_to_params(cfg: ModelConfig, tensors: dict[str, np.ndarray], dtype=None):
    """Params pytree from a dict of HF tensors (exact; cast to `dtype` or cfg.param_dtype)."""
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    _check_names_and_shapes(cfg, {k: tuple(t.shape) for k, t in tensors.items()}, "<tensor dict>",
                            lambda n: tensors[n])
    params: dict = {}
    for spec in tensor_specs(cfg):
        if spec.layered:
            leaf = np.stack([spec.to_ours(np.asarray(tensors[n])) for n in spec.names(cfg.num_hidden_layers)])
        else:
            leaf = spec.to_ours(np.asarray(tensors[spec.hf_name]))
        _set(params, spec.path, jnp.asarray(leaf.astype(dtype)))
    return params


# ----------------------------------------------------------------------------------------------- load
def _weight_files(path: Path) -> dict[str, str]:
    """tensor name -> safetensors file name, from the index or the single file(s)."""
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index (needs a 'weight_map' object): {e}") from None
        for fname in sorted(set(weight_map.values())):
            if not (path / fname).exists():
                raise FileNotFoundError(f"{index} lists shard {fname!r}, which is missing from {path}")
        return weight_map
    files = [path / SINGLE_NAME] if (path / SINGLE_NAME).exists() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors file")
    weight_map = {}
    for fp in files:
        with safe_open(fp, framework="np") as f:
            for k in f.keys():
                if k in weight_map:
                    raise ValueError(f"{path}: tensor {k!r} appears in both {weight_map[k]} and {fp.name}")
                weight_map[k] = fp.name
    return weight_map


def _check_names_and_shapes(cfg: ModelConfig, shapes: dict[str, tuple], where: str, read=None):
    expected = {}
    for spec in tensor_specs(cfg):
        for name in spec.names(cfg.num_hidden_layers):
            expected[name] = spec.hf_shape
    missing = [n for n in expected if n not in shapes]
    if missing:
        lines = "\n".join(f"  {n}  expected shape {list(expected[n])}" for n in missing[:8])
        more = f"\n  ... and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"{where}: {len(missing)} missing tensor(s):\n{lines}{more}")
    extra = [n for n in shapes if n not in expected]
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        # Some tied checkpoints still store the head; accept it only if it really is the embedding.
        if read is None or not np.array_equal(read("lm_head.weight"), read("model.embed_tokens.weight")):
            raise ValueError(f"{where}: tensor 'lm_head.weight' is present but config.json says "
                             "tie_word_embeddings=true and it differs from model.embed_tokens.weight")
        extra.remove("lm_head.weight")
    if extra:
        lines = "\n".join(f"  {n}  shape {list(shapes[n])}" for n in extra[:8])
        raise ValueError(f"{where}: {len(extra)} unexpected tensor(s) for this config "
                         f"(num_hidden_layers={cfg.num_hidden_layers}, tie_word_embeddings={cfg.tie_word_embeddings}):"
                         f"\n{lines}")
    for n, shape in expected.items():
        if tuple(shapes[n]) != tuple(shape):
            raise ValueError(f"{where}: tensor {n!r} has shape {list(shapes[n])}, expected {list(shape)} "
                             "(from config.json)")


def read_config(path: str | os.PathLike, **runtime) -> ModelConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
    try:
        d = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    try:
        return ModelConfig.from_hf_dict(d, **runtime)
    except ValueError as e:
        raise ValueError(f"{cfg_file}: {e}") from None


def load_hf(path: str | os.PathLike, dtype=jnp.float32, *, mesh=None, rules=None, compute_dtype=None,
            **runtime) -> tuple[ModelConfig, dict]:
    """Load an HF MiniCPM checkpoint directory.

    Args:
      path: directory with config.json and model.safetensors or sharded files + model.safetensors.index.json.
      dtype: parameter dtype; every tensor is cast as it is read.
      mesh: optional device mesh; each parameter is then created with its logical sharding and each device reads
        only its own slice of the layers.
      compute_dtype: activation dtype for the returned config (default: same as `dtype`).
      runtime: other run-time ModelConfig fields (scan_layers, remat_policy, sparse_impl, ...).
    Returns:
      (cfg, params) with params a nested dict of jax arrays.
    """
    path = Path(path)
    dname = jnp.dtype(dtype).name
    cfg = read_config(path, param_dtype=dname, dtype=jnp.dtype(compute_dtype or dtype).name, **runtime)
    weight_map = _weight_files(path)
    with ExitStack() as stack:
        handles = {fn: stack.enter_context(safe_open(path / fn, framework="np")) for fn in set(weight_map.values())}
        shapes = {}
        for name, fn in weight_map.items():
            if name not in handles[fn].keys():
                raise ValueError(f"{path / INDEX_NAME}: maps {name!r} to {fn}, which does not contain it")
            shapes[name] = tuple(handles[fn].get_slice(name).get_shape())
        read = lambda n: handles[weight_map[n]].get_tensor(n)
        _check_names_and_shapes(cfg, shapes, str(path), read)

        abstract = abstract_params(cfg)
        if mesh is not None:
            shardings = logical_shardings(abstract, param_logical_axes(cfg), mesh, rules or LOGICAL_RULES)
        else:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: dev, abstract)
        np_dtype = jnp.dtype(dname)
        params: dict = {}
        for spec in tensor_specs(cfg):
            leaf_abs = _get(abstract, spec.path)
            sharding = _get(shardings, spec.path)

            def callback(index, spec=spec):
                if spec.layered:
                    layers = range(cfg.num_hidden_layers)[index[0]]
                    arr = np.stack([spec.to_ours(read(spec.hf_name.format(i=i))).astype(np_dtype) for i in layers])
                    return arr[(slice(None),) + tuple(index[1:])]
                return spec.to_ours(read(spec.hf_name)).astype(np_dtype)[index]

            _set(params, spec.path, jax.make_array_from_callback(leaf_abs.shape, sharding, callback))
    return cfg, params


# ----------------------------------------------------------------------------------------------- save
def save_hf(path: str | os.PathLike, cfg: ModelConfig, params, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            dtype=None) -> Path:
    """Write params as an HF MiniCPM checkpoint (sharded above `max_shard_bytes`), atomically.

    The files appear under `path` only when all of them are complete: they are written into a temporary sibling
    directory that then replaces `path`. In a multi-process run every process must call this (arrays are gathered);
    process 0 writes.
    """
    path = Path(path)
    specs = tensor_specs(cfg)
    out_dtype = jnp.dtype(dtype or cfg.param_dtype)
    # Plan shards from shapes alone, in checkpoint order.
    entries = [(name, spec, i) for spec in specs
               for i, name in enumerate(spec.names(cfg.num_hidden_layers))]
    nbytes = lambda spec: int(np.prod(spec.hf_shape)) * out_dtype.itemsize
    shards, cur, cur_bytes = [], [], 0
    for e in entries:
        if cur and cur_bytes + nbytes(e[1]) > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(e)
        cur_bytes += nbytes(e[1])
    shards.append(cur)

    leaves = {spec.path: None for spec in specs}
    writer = jax.process_index() == 0
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent)) if writer else None
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards):
            fname = SINGLE_NAME if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name, spec, i in shard:
                if leaves[spec.path] is None:          # gather each stacked leaf once
                    leaves[spec.path] = to_host(_get(params, spec.path))
                leaf = leaves[spec.path]
                t = spec.to_hf(leaf[i] if spec.layered else leaf).astype(out_dtype)
                tensors[name] = t
                weight_map[name] = fname
                total += t.nbytes
            if writer:
                save_file(tensors, tmp / fname, metadata={"format": "pt"})
            # free host copies of leaves whose last tensor is written
            last = {spec.path for _, spec, _ in shard}
            for p in last:
                if all(weight_map.get(n) for n in _spec_by_path(specs, p).names(cfg.num_hidden_layers)):
                    leaves[p] = None
        if not writer:
            return path
        hf_cfg = cfg.to_hf_dict()
        hf_cfg["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[out_dtype.name]
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id),
                                  ("eos_token_id", list(cfg.eos_ids) if isinstance(cfg.eos_token_id, tuple)
                                   else cfg.eos_token_id), ("pad_token_id", cfg.pad_token_id)) if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        replace_dir(tmp, path)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def replace_dir(src: Path, dst: Path):
    """Move the finished directory `src` to `dst`; an existing `dst` is replaced only after `src` is complete."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dst)


# ----------------------------------------------------------------------------------------------- helpers
def _spec_by_path(specs, path):
    return next(s for s in specs if s.path == path)


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))
