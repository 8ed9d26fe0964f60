"""MiniCPM4 as pure-functional Flax Linen modules, and the public `forward` / `init_params`.

The whole forward pass (HF `MiniCPMForCausalLM`), μP scalars included:

    h = embed(ids) * scale_emb
    for each layer:                       alpha = scale_depth / sqrt(num_hidden_layers)
        h = h + alpha * attn(rmsnorm(h))  GQA, RoPE (rotate-half, fp32, LongRoPE), dense or InfLLM v2 sparse
        h = h + alpha * mlp(rmsnorm(h))   SwiGLU
    logits = head(rmsnorm(h) / (hidden_size / dim_model_base))   tied or untied head, float32 logits

Layers are one `nn.scan` over stacked parameters (a leading `layers` axis); `scan_layers=False` unrolls the same
loop, so both settings share one parameter layout. Caches are explicit pytrees passed in and returned.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from minicpm_jax import sparse as sp
from minicpm_jax.attention import dense_attention
from minicpm_jax.attention_plan import check_mode, plan_attention
from minicpm_jax.config import ModelConfig
from minicpm_jax.kv_cache import write_rows
from minicpm_jax.layers import MLP, Projection, RMSNorm, dtype_of, hidden_init_std
from minicpm_jax.rope import apply_rope, rope_cos_sin
from minicpm_jax.sharding import LOGICAL_RULES, attention_layout, logical_shardings
from minicpm_jax.tree_attention import TreeLayout, tree_dense_attention, tree_sparse_attention

CACHE_MODES = ("none", "prefill", "decode")

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


def _select_rows(use_rows: jnp.ndarray, dense_fn, sparse_fn):
    """Per-row choice between two attention results, computing only what some row needs."""
    def mixed():
        return jnp.where(use_rows[:, None, None, None], sparse_fn(), dense_fn())
    branch = jnp.where(jnp.all(use_rows), 2, jnp.where(jnp.any(use_rows), 1, 0))
    return jax.lax.switch(branch, [dense_fn, mixed, sparse_fn])


def _sparse_mesh_args(layout) -> dict:
    """The sparse dispatch's mesh arguments (whole KV groups: batch_axes, head_axes)."""
    return {} if layout is None else dict(mesh=layout.mesh, batch_axes=layout.batch_axes, head_axes=layout.head_axes)


def _dense_per_shard(fn, layout, q, k, v, *rows):
    """dense fn(q, k, v, *rows) per shard of `layout` (`sharding.attention_layout(..., split_groups=True)`): q
    [B, T, Hq, D] by rows and query heads, k/v [B, S, Hkv, D] by rows and KV heads (all of them on an axis that
    splits groups: each device then takes its heads' group), the [B, T] arguments (None allowed) by rows."""
    ra = layout.batch_axes or None
    xq, xkv, r = P(ra, None, layout.head_axes or None, None), P(ra, None, layout.kv_head_axes or None, None), P(ra, None)
    given = [a for a in rows if a is not None]
    hq_local = q.shape[2] // math.prod(layout.mesh.shape[a] for a in layout.head_axes)
    group = q.shape[2] // k.shape[2]

    def local(q_, k_, v_, *given_):
        if layout.splits_groups:   # this device's query heads all lie in KV group g
            first_head = jax.lax.axis_index(layout.head_axes) * hq_local
            k_, v_ = (jax.lax.dynamic_slice_in_dim(x, first_head // group, 1, axis=2) for x in (k_, v_))
        it = iter(given_)
        return fn(q_, k_, v_, *(None if a is None else next(it) for a in rows))
    return jax.shard_map(local, mesh=layout.mesh, in_specs=(xq, xkv, xkv) + (r,) * len(given), out_specs=xq,
                         check_vma=False)(q, k, v, *given)


def _unpin(out, layout):
    """The attention output back in the projections' layout, so the attention layout does not propagate into them."""
    return out if layout is None else nn.with_logical_constraint(out, ("batch", "seq", "heads", "head_dim"))


class Attention(nn.Module):
    """GQA self-attention without biases. `attention` picks dense / InfLLM v2 sparse / auto (by KV length).

    tree: decode steps only; the new tokens are the nodes of a token tree (`tree_attention.TreeLayout`, whose
    first tree slot is write_start - tree.offset) instead of a chain."""

    cfg: ModelConfig
    attention: str = "auto"
    cache_mode: str = "none"
    tree: Optional[TreeLayout] = None

    @nn.compact
    def __call__(self, x, cos, sin, q_slot, segment_ids, layer_cache, write_start, valid_lengths):
        cfg = self.cfg
        h, hq, hkv, d, std = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                              hidden_init_std(cfg))
        q = Projection(cfg, (h,), (hq, d), ("embed",), ("heads", "head_dim"), std, name="q_proj")(x)
        k = Projection(cfg, (h,), (hkv, d), ("embed",), ("kv_heads", "head_dim"), std, name="k_proj")(x)
        v = Projection(cfg, (h,), (hkv, d), ("embed",), ("kv_heads", "head_dim"), std, name="v_proj")(x)
        q_nope, k_nope = q, k
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = nn.with_logical_constraint(q, ("batch", "seq", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "seq", "kv_heads", "head_dim"))

        new_cache = None
        if self.cache_mode == "none":
            out = self._attend_fresh(q, k, v, q_nope, k_nope, q_slot, segment_ids, valid_lengths)
        else:
            kc, vc, sc = layer_cache
            kc, vc = write_rows(kc, k, write_start), write_rows(vc, v, write_start)
            if self.cache_mode == "prefill":       # cache was empty: attend over the fresh keys only (T, not S)
                out = self._attend_fresh(q, k, v, q_nope, k_nope, q_slot, None, valid_lengths)
                if sc is not None:
                    sc = sp.compressed_cache_from_keys(kc, valid_lengths, cfg.sparse_config, kc.shape[1])
            elif self.tree is not None:
                out = self._attend_tree(q, kc, vc, write_start - self.tree.offset, sc)
            else:
                out, sc = self._attend_cache(q, kc, vc, q_slot, sc, valid_lengths)
            new_cache = (kc, vc, sc)
        out = checkpoint_name(out, "attn_out")
        o = Projection(cfg, (hq, d), (h,), ("heads", "head_dim"), ("embed",), std, name="o_proj")(out)
        return o, new_cache

    def _attend_fresh(self, q, k, v, q_nope, k_nope, q_slot, segment_ids, valid_lengths):
        """Prefill / training: queries are all positions of the fresh keys."""
        cfg = self.cfg
        b, _, hq, _ = q.shape
        hkv = k.shape[2]
        plan = plan_attention(cfg, self.attention, k.shape[1])
        v = nn.with_logical_constraint(v, ("batch", "seq", "kv_heads", "head_dim"))

        def dense():
            fn = functools.partial(dense_attention, chunk_size=cfg.attention_chunk_size)
            layout = attention_layout(b, hq, hkv, split_groups=True)
            if layout is None:
                return fn(q, k, v, q_slot, segment_ids, segment_ids)
            return _unpin(_dense_per_shard(fn, layout, q, k, v, q_slot, segment_ids, segment_ids), layout)
        if not plan.sparse:
            return dense()
        scfg = cfg.sparse_config
        score = dict(q_score=q_nope, k_score=k_nope) if scfg.use_nope else {}

        def sparse():
            layout = attention_layout(b, hq, hkv)
            out = sp.infllm_v2_attention(q, k, v, scfg, impl=plan.impl, segment_ids=segment_ids,
                                         **_sparse_mesh_args(layout), **score)
            return _unpin(out, layout)
        if not plan.per_row or valid_lengths is None:
            return sparse()
        return _select_rows(valid_lengths >= scfg.dense_len, dense, sparse)   # HF decides per sequence

    def _attend_cache(self, q, kc, vc, q_slot, sc, valid_lengths):
        """Decode: queries attend the cache (slots <= their own)."""
        cfg = self.cfg
        dense = functools.partial(dense_attention, q, kc, vc, q_slot, chunk_size=cfg.attention_chunk_size)
        if sc is None:
            if self.attention == "sparse":
                raise ValueError("sparse decode needs a KVCache built with a compressed-key cache "
                                 "(init_cache(..., attention='sparse'))")
            return dense(), sc
        scfg = cfg.sparse_config
        # T new keys complete at most T // stride + 1 kernels (coarse kernels have a larger stride)
        sc = sp.update_compressed_cache(sc, kc, valid_lengths, scfg,
                                        max_new_kernels=q.shape[1] // scfg.kernel_stride + 1)

        def sparse():
            layout = attention_layout(q.shape[0], q.shape[2], kc.shape[2])
            return sp.infllm_v2_decode(q, kc, vc, valid_lengths, sc, scfg, impl=cfg.sparse_impl,
                                       **_sparse_mesh_args(layout))
        if self.attention == "dense":              # compressed keys stay in sync for a later switch
            return dense(), sc
        if self.attention == "sparse" or scfg.always_sparse:
            return sparse(), sc
        return _select_rows(valid_lengths >= scfg.dense_len, dense, sparse), sc

    def _attend_tree(self, q, kc, vc, base, sc):
        """Decode of a token tree whose first slot is base [B] (tree_attention.py). The compressed keys are only
        read: the caller compacts the accepted path and extends them once."""
        cfg, tree = self.cfg, self.tree
        dense = functools.partial(tree_dense_attention, q, kc, vc, base, tree)
        if sc is None:
            if self.attention == "sparse":
                raise ValueError("sparse decode needs a KVCache built with a compressed-key cache "
                                 "(init_cache(..., attention='sparse'))")
            return dense()
        if self.attention == "dense":
            return dense()
        scfg = cfg.sparse_config
        sparse = functools.partial(tree_sparse_attention, q, kc, vc, base, sc, tree, scfg, cfg.sparse_impl)
        if self.attention == "sparse" or scfg.always_sparse:
            return sparse()
        # "auto": plain decoding of node i runs sparse once its own view (prefix + root path) reaches dense_len
        view_len = base[:, None] + jnp.asarray([len(p) for p in tree.paths], jnp.int32)[None]
        use = view_len >= scfg.dense_len                                              # [B, T]
        mixed = lambda: jnp.where(use[:, :, None, None], sparse(), dense())
        branch = jnp.where(jnp.all(use), 2, jnp.where(jnp.any(use), 1, 0))
        return jax.lax.switch(branch, [dense, mixed, sparse])


class DecoderLayer(nn.Module):
    """Pre-norm block; each branch is scaled by scale_depth / sqrt(L) before the residual add."""

    cfg: ModelConfig
    attention: str = "auto"
    cache_mode: str = "none"
    tree: Optional[TreeLayout] = None

    @nn.compact
    def __call__(self, h, layer_cache, cos, sin, q_slot, segment_ids, write_start, valid_lengths):
        cfg = self.cfg
        alpha = cfg.residual_scale
        a, new_cache = Attention(cfg, self.attention, self.cache_mode, self.tree, name="self_attn")(
            RMSNorm(cfg, name="input_layernorm")(h), cos, sin, q_slot, segment_ids, layer_cache, write_start,
            valid_lengths)
        h = h + a * alpha
        m = MLP(cfg, name="mlp")(RMSNorm(cfg, name="post_attention_layernorm")(h))
        h = h + m * alpha
        h = nn.with_logical_constraint(h, ("batch", "seq", "embed"))
        return h, new_cache


class MiniCPM(nn.Module):
    """MiniCPMForCausalLM. Parameter names mirror the HF checkpoint (embed_tokens, layers.*, norm, lm_head).

    tree: a decode step over the nodes of a token tree (see `Attention`; speculative tree verification)."""

    cfg: ModelConfig
    attention: str = "auto"
    cache_mode: str = "none"
    tree: Optional[TreeLayout] = None

    @nn.compact
    def __call__(self, input_ids, positions, q_slot, segment_ids=None, cache=None, write_start=None,
                 valid_lengths=None, kv_len=None, logits_index=None, return_hidden=False):
        """See `forward` (no cache) and `minicpm_jax.decode` (prefill / decode) for the argument contracts."""
        cfg = self.cfg
        dtype = dtype_of(cfg.dtype)
        embedding = self.param("embed_tokens", nn.with_logical_partitioning(
            nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size), dtype_of(cfg.param_dtype))
        h = jnp.take(embedding, input_ids, axis=0).astype(dtype) * jnp.asarray(cfg.scale_emb, dtype)
        h = nn.with_logical_constraint(h, ("batch", "seq", "embed"))
        self.sow("intermediates", "embedding", h)    # no-op unless applied with mutable "intermediates" (μP checks)
        cos, sin = rope_cos_sin(cfg, positions, input_ids.shape[1] if kv_len is None else kv_len)

        layer_cls = DecoderLayer
        if cfg.remat_policy != "none":
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT[cfg.remat_policy], prevent_cse=False)
        cache_axis = nn.broadcast if cache is None else 0
        # "intermediates" stacks per layer, so `capture_intermediates` sees inside the scan (bench/mup.py)
        stack = nn.scan(layer_cls, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                        in_axes=(cache_axis,) + (nn.broadcast,) * 6, length=cfg.num_hidden_layers,
                        unroll=1 if cfg.scan_layers else cfg.num_hidden_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        h, new_cache = stack(cfg, self.attention, self.cache_mode, self.tree, name="layers")(
            h, cache, cos, sin, q_slot, segment_ids, write_start, valid_lengths)

        h = RMSNorm(cfg, name="norm")(h)
        h = h / jnp.asarray(cfg.width_mult, dtype)                  # μP: hidden ÷ (hidden_size / dim_model_base)
        if logits_index is not None:                               # only the rows' chosen positions reach the head
            h = jnp.take_along_axis(h, logits_index[:, None, None], axis=1)
        lm_head = None
        if not cfg.tie_word_embeddings:
            lm_head = self.param("lm_head", nn.with_logical_partitioning(
                nn.initializers.normal(cfg.initializer_range), ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size), dtype_of(cfg.param_dtype))
        if return_hidden:
            return h, new_cache
        return head_logits(cfg, embedding, lm_head, h), new_cache


def head_logits(cfg: ModelConfig, embedding, lm_head, h):
    """float32 logits from the final hidden state h [..., hidden] (already ÷ width_mult).

    Tied: h @ embed_tokens.T; untied: h @ lm_head. The matmul runs in the compute dtype, accumulating in float32.
    """
    dtype = dtype_of(cfg.dtype)
    if cfg.tie_word_embeddings:
        out = jnp.einsum("...e,ve->...v", h.astype(dtype), nn.unbox(embedding).astype(dtype),
                         preferred_element_type=jnp.float32)
    else:
        out = jnp.einsum("...e,ev->...v", h.astype(dtype), nn.unbox(lm_head).astype(dtype),
                         preferred_element_type=jnp.float32)
    return nn.with_logical_constraint(out, ("batch", "seq", "vocab"))


def default_positions(input_ids: jnp.ndarray) -> jnp.ndarray:
    b, t = input_ids.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "return_hidden"))
def forward(params, cfg: ModelConfig, input_ids: jnp.ndarray, positions: Optional[jnp.ndarray] = None,
            segment_ids: Optional[jnp.ndarray] = None, attention: str = "auto", return_hidden: bool = False,
            valid_lengths: Optional[jnp.ndarray] = None):
    """Full-sequence forward pass (training / scoring).

    Args:
      params: parameter pytree from `init_params` or `load_hf`.
      cfg: the model config (static).
      input_ids: int [B, T].
      positions: int [B, T] RoPE positions; default arange(T). Packed rows restart at 0 per document.
      segment_ids: int [B, T] document ids of packed rows; a token attends only earlier tokens of its own segment.
      attention: "auto" (dense below sparse_config.dense_len total KV length, InfLLM v2 above), "dense", "sparse".
      return_hidden: return the final hidden state (already ÷ width_mult, before the head) instead of logits.
      valid_lengths: int [B] or None, each row's true length when rows hold one document followed by padding (the
        sparse path's batches). With attention="auto" a row shorter than sparse_config.dense_len then runs dense and
        a longer one InfLLM v2, and LongRoPE picks its factor set on that length: what HF does for each sequence
        alone. None: the padded length T decides for every row.
    Returns:
      float32 logits [B, T, vocab_size] (or the hidden state [B, T, hidden_size] in the compute dtype).
    """
    check_mode(attention)
    if positions is None:
        positions = default_positions(input_ids)
    q_slot = default_positions(input_ids)
    out, _ = MiniCPM(cfg, attention).apply({"params": params}, input_ids, positions, q_slot,
                                           segment_ids=segment_ids, valid_lengths=valid_lengths,
                                           kv_len=valid_lengths, return_hidden=return_hidden)
    return out


def compute_logits(params, cfg: ModelConfig, hidden: jnp.ndarray) -> jnp.ndarray:
    """The head alone: float32 logits from `forward(..., return_hidden=True)` output (for chunked losses)."""
    return head_logits(cfg, params["embed_tokens"], params.get("lm_head"), hidden)


def _init_fn(cfg: ModelConfig):
    model = MiniCPM(cfg, "dense")
    ids = jnp.zeros((1, 8), jnp.int32)
    pos = default_positions(ids)
    return lambda rng: model.init(rng, ids, pos, pos)["params"]


def _is_boxed(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def param_logical_axes(cfg: ModelConfig):
    """Pytree (same structure as the params) of logical axis-name tuples, e.g. ('layers', 'embed', 'heads', ...)."""
    boxed = jax.eval_shape(_init_fn(cfg), jax.random.key(0))
    return jax.tree.map(lambda x: tuple(x.names), boxed, is_leaf=_is_boxed)


def abstract_params(cfg: ModelConfig):
    """Pytree of jax.ShapeDtypeStruct for the parameters (no memory allocated)."""
    return nn.unbox(jax.eval_shape(_init_fn(cfg), jax.random.key(0)))


def init_params(cfg: ModelConfig, rng: jax.Array, mesh=None, rules=None):
    """Initialise parameters with the μP-style init (see `layers.hidden_init_std`).

    Embedding (and untied head): N(0, initializer_range); attention and MLP matrices:
    N(0, initializer_range / sqrt(hidden_size / dim_model_base)); norm weights: 1.
    With `mesh`, each parameter is created directly with its sharding (no full copy on one device).
    Returns a plain nested dict of arrays in `cfg.param_dtype`.
    """
    init = _init_fn(cfg)
    unboxed = lambda r: nn.unbox(init(r))
    if mesh is None:
        return jax.jit(unboxed)(rng)
    shardings = logical_shardings(abstract_params(cfg), param_logical_axes(cfg), mesh, rules or LOGICAL_RULES)
    return jax.jit(unboxed, out_shardings=shardings)(rng)
