"""Cached decoding: jitted prefill and decode steps over an explicit KV cache, and `generate`.

Prompts of different lengths share one batch: rows are right-padded, prefilled together (causal attention keeps the
padding invisible to real tokens), and every row then decodes at its own position, overwriting its padding slots.
The logits of prefill + decode equal the full forward pass on the same tokens (tests hold them to it).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from minicpm_jax.attention_plan import check_mode
from minicpm_jax.config import ModelConfig
from minicpm_jax.kv_cache import KVCache, init_cache
from minicpm_jax.model import MiniCPM, compute_logits
from minicpm_jax.sampling import GenerationSettings, sample_token
from minicpm_jax.unstacked import apply_split, is_split, split_for_backend


def _apply_with_cache(params, cfg, attention, mode, tokens, positions, q_slot, cache: KVCache, write_start,
                      valid_lengths, logits_index, return_hidden=False):
    if is_split(params):                                   # per-layer weights (`unstacked.split_layers`)
        out, (k, v, sc) = apply_split(params, cfg, attention, mode, tokens, positions, q_slot,
                                      (cache.k, cache.v, cache.sparse), write_start, valid_lengths, logits_index,
                                      return_hidden)
        return out, KVCache(k=k, v=v, lengths=valid_lengths.astype(jnp.int32), sparse=sc)
    model = MiniCPM(cfg, attention, mode)
    out, (k, v, sc) = model.apply({"params": params}, tokens, positions, q_slot,
                                  cache=(cache.k, cache.v, cache.sparse), write_start=write_start,
                                  valid_lengths=valid_lengths, kv_len=valid_lengths, logits_index=logits_index,
                                  return_hidden=return_hidden)
    return out, KVCache(k=k, v=v, lengths=valid_lengths.astype(jnp.int32), sparse=sc)


@functools.partial(jax.jit, static_argnames=("cfg", "attention"), donate_argnames=("cache",))
def prefill(params, cfg: ModelConfig, tokens: jnp.ndarray, lengths: jnp.ndarray, cache: KVCache,
            attention: str = "auto"):
    """Fill an empty cache with right-padded prompts.

    Args:
      tokens: int32 [B, T] prompts, right-padded; lengths: int32 [B] real prompt lengths (>= 1).
      cache: an empty KVCache with capacity >= T (donated).
    Returns:
      (logits float32 [B, V] at each row's last prompt token, cache with lengths = `lengths`).
    """
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache = _apply_with_cache(params, cfg, attention, "prefill", tokens, pos, pos, cache,
                                      jnp.zeros((b,), jnp.int32), lengths, lengths - 1)
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("cfg", "attention"), donate_argnames=("cache",))
def decode_step(params, cfg: ModelConfig, tokens: jnp.ndarray, cache: KVCache, attention: str = "auto"):
    """Append tokens [B, T] (usually T = 1) at each row's current length; returns (logits [B, T, V], cache)."""
    return _append(params, cfg, tokens, cache, attention, return_hidden=False)


def _append(params, cfg, tokens, cache: KVCache, attention, return_hidden):
    """The model over tokens [B, T] written at each row's cache length: (logits or hidden [B, T, .], cache)."""
    t = tokens.shape[1]
    start = cache.lengths
    slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    return _apply_with_cache(params, cfg, attention, "decode", tokens, slots, slots, cache, start, start + t, None,
                             return_hidden=return_hidden)


@functools.partial(jax.jit, static_argnames=("cfg", "attention"), donate_argnames=("cache",))
def prefill_with_hidden(params, cfg: ModelConfig, tokens: jnp.ndarray, lengths: jnp.ndarray, cache: KVCache,
                        attention: str = "auto"):
    """`prefill` that also returns the final hidden state of every prompt position (what a draft head reads).

    Returns (logits float32 [B, V] at each row's last prompt token, hidden [B, T, H] (÷ width_mult, before the
    head; padding positions hold garbage), cache)."""
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    hidden, cache = _apply_with_cache(params, cfg, attention, "prefill", tokens, pos, pos, cache,
                                      jnp.zeros((b,), jnp.int32), lengths, None, return_hidden=True)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)
    return compute_logits(params, cfg, last)[:, 0], hidden, cache


@functools.partial(jax.jit, static_argnames=("cfg", "attention"), donate_argnames=("cache",))
def decode_step_with_hidden(params, cfg: ModelConfig, tokens: jnp.ndarray, cache: KVCache, attention: str = "auto"):
    """`decode_step` that also returns the final hidden states: (logits [B, T, V], hidden [B, T, H], cache)."""
    hidden, cache = _append(params, cfg, tokens, cache, attention, return_hidden=True)
    return compute_logits(params, cfg, hidden), hidden, cache


@dataclasses.dataclass
class GenerateResult:
    """tokens: int32 [B, max_new_tokens] (pad_id after a row stops); lengths: tokens generated per row (a final
    EOS included); finished: whether the row stopped at an EOS."""

    tokens: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "capacity", "attention"))
def _generate(params, cfg: ModelConfig, tokens, lengths, rng, temperature, top_k, top_p, eos, pad_id,
              max_new_tokens: int, capacity: int, attention: str):
    b = tokens.shape[0]
    params = split_for_backend(params)    # once per call, outside the token loop (XLA:CPU copies sliced weights)
    cache = init_cache(cfg, b, capacity, attention)       # built inside the jit: no second copy of the cache
    logits, cache = prefill(params, cfg, tokens, lengths, cache, attention)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)
    n_gen = jnp.zeros((b,), jnp.int32)

    def cond(state):
        step, _, _, done, _, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, logits, cache, done, out, n_gen, rng = state
        rng, sub = jax.random.split(rng)
        tok = sample_token(logits, sub, temperature, top_k, top_p)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, step].set(tok)
        n_gen = n_gen + (~done).astype(jnp.int32)
        done = done | jnp.isin(tok, eos)
        nxt, cache = decode_step(params, cfg, tok[:, None], cache, attention)
        return step + 1, nxt[:, 0], cache, done, out, n_gen, rng

    state = (jnp.int32(0), logits, cache, done, out, n_gen, rng)
    _, _, _, done, out, n_gen, _ = jax.lax.while_loop(cond, body, state)
    return out, n_gen, done


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclasses.dataclass
class Prompts:
    """A batch of prompts ready for a jitted generation loop: tokens int32 [B, T] right-padded (T bucketed to 16),
    lengths int32 [B], capacity (cache slots), eos int32 [E] (-1 when none), pad int32 scalar."""

    tokens: jnp.ndarray
    lengths: jnp.ndarray
    capacity: int
    eos: jnp.ndarray
    pad: jnp.ndarray


def prepare_prompts(cfg: ModelConfig, prompt_ids, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    eos_token_id=None, pad_id: Optional[int] = None, extra_capacity: int = 0) -> Prompts:
    """Validate prompts and knobs (ValueError naming the problem) and pad them into one batch.

    extra_capacity: cache slots beyond prompt + max_new_tokens (speculative decoding writes k+1 ahead)."""
    if isinstance(prompt_ids, np.ndarray) or hasattr(prompt_ids, "shape"):
        prompt_ids = [list(map(int, row)) for row in np.asarray(prompt_ids)]
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("generate: every prompt needs at least one token (usually BOS)")
    GenerationSettings(max_new_tokens, float(temperature), int(top_k), float(top_p))   # validates (ValueError)
    longest = max(len(p) for p in prompt_ids)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"generate: a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's max_position_embeddings={cfg.max_position_embeddings}")
    for p in prompt_ids:
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"generate: token ids {bad[:5]} are outside [0, vocab_size={cfg.vocab_size})")
    b = len(prompt_ids)
    lengths = np.array([len(p) for p in prompt_ids], np.int32)
    t = _round_up(int(lengths.max()), 16)          # bucket prompt lengths to limit recompiles
    pad = cfg.pad_token_id if pad_id is None else pad_id
    pad = 0 if pad is None else pad
    tokens = np.full((b, t), pad, np.int32)
    for i, p in enumerate(prompt_ids):
        tokens[i, :len(p)] = p
    eos = cfg.eos_ids if eos_token_id is None else ((eos_token_id,) if isinstance(eos_token_id, int)
                                                    else tuple(eos_token_id))
    return Prompts(tokens=jnp.asarray(tokens), lengths=jnp.asarray(lengths),
                   capacity=_round_up(t + max_new_tokens + extra_capacity, 16),
                   eos=jnp.asarray(eos if eos else (-1,), jnp.int32), pad=jnp.int32(pad))


def generate(params, cfg: ModelConfig, prompt_ids: Sequence[Sequence[int]] | np.ndarray, max_new_tokens: int = 32,
             *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, rng: Optional[jax.Array] = None,
             eos_token_id: Optional[Sequence[int] | int] = None, pad_id: Optional[int] = None,
             attention: str = "auto") -> GenerateResult:
    """Generate continuations for a batch of prompts of different lengths (one jitted prefill + decode loop).

    Args:
      prompt_ids: a list of token-id lists, or an int array [B, T] of equal-length prompts.
      temperature: 0 = greedy; otherwise sample from softmax(logits / temperature) after top-k / top-p filtering.
      eos_token_id: ids that stop a row (default: cfg.eos_token_id); pass [] to never stop early.
      attention: "auto" | "dense" | "sparse" (see `forward`).
    """
    check_mode(attention)
    prep = prepare_prompts(cfg, prompt_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_id)
    rng = jax.random.key(0) if rng is None else rng
    out, n_gen, done = _generate(params, cfg, prep.tokens, prep.lengths, rng, jnp.float32(temperature),
                                 jnp.int32(top_k), jnp.float32(top_p), prep.eos, prep.pad, max_new_tokens,
                                 prep.capacity, attention)
    return GenerateResult(tokens=np.asarray(out), lengths=np.asarray(n_gen), finished=np.asarray(done))
