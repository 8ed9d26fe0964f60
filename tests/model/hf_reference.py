"""An independent float64 numpy implementation of the HF MiniCPM forward pass (modeling_minicpm.py), for tests.

It works on HF-layout tensors (torch `[out, in]` weights, names as in the checkpoint) and shares no code with the
JAX model, so the two can only agree if both follow the HF semantics.
"""

import math

import numpy as np


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotary(cfg, positions, seq_len):
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    inv = 1.0 / (cfg["rope_theta"] ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs, scaling = cfg.get("rope_scaling"), 1.0
    if rs:
        orig, max_pos = rs["original_max_position_embeddings"], cfg["max_position_embeddings"]
        cached = max(max_pos, seq_len)            # HF regrows its cos/sin cache past max_position_embeddings
        ext = np.asarray(rs["long_factor"] if cached > orig else rs["short_factor"], np.float64)
        inv = inv / ext
        scaling = math.sqrt(1 + math.log(max_pos / orig) / math.log(orig))
    freqs = positions[..., None].astype(np.float64) * inv
    emb = np.concatenate([freqs, freqs], -1)
    return np.cos(emb) * scaling, np.sin(emb) * scaling


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def forward(cfg, w, ids, positions=None, segment_ids=None):
    """cfg: HF config dict; w: HF tensor dict; ids [B, T]. Returns float64 logits [B, T, V]."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    b, t = ids.shape
    hs, nh, nkv, nl = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                       cfg["num_hidden_layers"])
    d, eps = hs // nh, cfg["rms_norm_eps"]
    positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else positions
    cos, sin = rotary(cfg, positions, t)                                   # [B, T, D]
    cos, sin = cos[:, None], sin[:, None]                                  # [B, 1, T, D]
    mask = np.tril(np.ones((t, t), bool))[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    alpha = cfg["scale_depth"] / math.sqrt(nl)
    h = w["model.embed_tokens.weight"][ids] * cfg["scale_emb"]
    for i in range(nl):
        p = f"model.layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).reshape(b, t, nh, d).transpose(0, 2, 1, 3)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).reshape(b, t, nkv, d).transpose(0, 2, 1, 3)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).reshape(b, t, nkv, d).transpose(0, 2, 1, 3)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)   # repeat_kv
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
        s = np.where(mask[:, None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        a = (s @ v).transpose(0, 2, 1, 3).reshape(b, t, nh * d) @ w[p + "self_attn.o_proj.weight"].T
        h = h + a * alpha
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        g = x @ w[p + "mlp.gate_proj.weight"].T
        m = ((g / (1 + np.exp(-g))) * (x @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        h = h + m * alpha
    h = rms_norm(h, w["model.norm.weight"], eps) / (hs / cfg["dim_model_base"])
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return h @ head.T


def random_weights(cfg, seed=0):
    """Random HF-layout tensors (float32) for a config dict; norm weights around 1 so they matter."""
    rng = np.random.default_rng(seed)
    hs, nh, nkv, nl, f, v = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
                             cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"])
    d = hs // nh
    n = lambda *s, std=0.08: (rng.standard_normal(s) * std).astype(np.float32)
    w = {"model.embed_tokens.weight": n(v, hs, std=0.1), "model.norm.weight": 1 + n(hs, std=0.1)}
    for i in range(nl):
        p = f"model.layers.{i}."
        w.update({
            p + "input_layernorm.weight": 1 + n(hs, std=0.1),
            p + "post_attention_layernorm.weight": 1 + n(hs, std=0.1),
            p + "self_attn.q_proj.weight": n(nh * d, hs), p + "self_attn.k_proj.weight": n(nkv * d, hs),
            p + "self_attn.v_proj.weight": n(nkv * d, hs), p + "self_attn.o_proj.weight": n(hs, nh * d),
            p + "mlp.gate_proj.weight": n(f, hs), p + "mlp.up_proj.weight": n(f, hs),
            p + "mlp.down_proj.weight": n(hs, f),
        })
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = n(v, hs, std=0.1)
    return w
