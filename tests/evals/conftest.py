"""Fixtures for the evaluation tests: a real SentencePiece tokenizer trained on the held-out haystack text, and one
small random MiniCPM model saved both as an HF checkpoint directory and as a training run directory (two checkpoint
steps with different weights), so `pretrained=` / `step=` go through the real weight resolver; and that model
exported to GGUF (f32 and q8_0) for the llama.cpp backend.

The model is 64 wide with 2 layers and 1024 positions: every forward and decode compiles in about a second on
2 CPU cores. Its weights are drawn with numpy, the hidden matrices 4x hotter than the μP init, so greedy text
varies instead of repeating one token. Its 1024 embedding rows exceed the tokenizer's 1000 pieces, as a padded
vocabulary does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import minicpm_jax as mc
from minicpm_jax.evals import haystack

N_PIECES = 1000
MAX_POS = 1024


def tiny_cfg(**kw) -> mc.ModelConfig:
    base = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, dim_model_base=64.0, max_position_embeddings=MAX_POS, sparse_config=None)
    base.update(kw)
    return mc.ModelConfig.tiny(**base)


def random_params(cfg: mc.ModelConfig, seed: int):
    from minicpm_jax.layers import hidden_init_std

    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith("['weight']"):
            x = 1.0 + rng.uniform(-0.1, 0.1, leaf.shape)
        elif "kernel" in name:
            x = rng.normal(0.0, 4 * hidden_init_std(cfg), leaf.shape)   # "hot" layers: varied greedy text
        else:
            x = rng.normal(0.0, 0.1, leaf.shape)
        return jnp.asarray(x, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, mc.abstract_params(cfg))


@dataclasses.dataclass
class TinyModel:
    cfg: mc.ModelConfig
    params: object          # the HF dir's weights = the run's last step
    params_step1: object    # the run's first step
    tokenizer: object
    hf_dir: Path
    run_dir: Path


@pytest.fixture(scope="session")
def tokenizer():
    from data_pipeline.tokenizer import train_sentencepiece

    texts = list(haystack.sentences("en")[:1500]) + list(haystack.sentences("zh")[:1500])
    return train_sentencepiece(texts, N_PIECES)


@pytest.fixture(scope="session")
def tiny(tokenizer, tmp_path_factory) -> TinyModel:
    from minicpm_jax.checkpoint import Checkpointer, run_paths

    cfg = tiny_cfg()
    p1, p2 = random_params(cfg, 1), random_params(cfg, 2)
    root = tmp_path_factory.mktemp("tiny-model")
    hf = root / "hf"
    mc.save_hf(hf, cfg, p2)
    tokenizer.save(hf)
    run = root / "run"
    paths = run_paths(run)
    paths["run"].mkdir()
    section = {k: v for k, v in dataclasses.asdict(cfg).items()
               if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "dim_model_base", "max_position_embeddings")}
    paths["config"].write_text(yaml.safe_dump({"model": {"preset": "tiny", "attention": "dense",
                                                         "sparse_config": None, **section}}))
    tokenizer.save(paths["tokenizer"])
    ckpt = Checkpointer(paths["checkpoints"], async_save=False, keep=5)
    ckpt.save(1, {"params": p1}, None, {"step": 1})
    ckpt.save(2, {"params": p2}, None, {"step": 2})
    ckpt.close()
    return TinyModel(cfg, p2, p1, tokenizer, hf, run)


@dataclasses.dataclass
class TinyGGUF:
    f32: Path
    q8_0: Path


@pytest.fixture(scope="session")
def tiny_gguf(tiny, tmp_path_factory) -> TinyGGUF:
    """The HF checkpoint's weights (`tiny.params`) exported to GGUF as f32 and q8_0, with the same tokenizer."""
    from minicpm_jax.export.gguf import to_gguf

    root = tmp_path_factory.mktemp("tiny-gguf")
    paths = {q: to_gguf(root / f"m-{q}.gguf", tiny.cfg, tiny.params, tiny.tokenizer, q).path for q in ("f32", "q8_0")}
    return TinyGGUF(paths["f32"], paths["q8_0"])
