"""`minicpm bench edge`: llama.cpp vs JAX on this CPU for one model exported at several qtypes, measured in one run.

For each qtype: GGUF file size, export time, llama.cpp prefill tokens/s (one batch of `prompt_len` tokens) and
decode tokens/s (`decode_tokens` single-token steps after it), next to the JAX CPU decode speed of the same weights
(jitted `decode_step` on a KV cache, float32). Weights are random (speed does not depend on them) and the file has no
tokenizer (`no_vocab`): the benchmark feeds token ids. llama.cpp runs as a user would run it: default F16 KV cache,
`n_threads` threads.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import minicpm_jax as mc
from minicpm_jax.export import llamacpp
from minicpm_jax.export.gguf import to_gguf
from minicpm_jax.unstacked import split_for_backend

PRESETS = ("0.5b", "tiny", "8b")


@dataclasses.dataclass
class EdgeRow:
    qtype: str
    threads: int
    file_mib: float
    export_s: float
    prefill_tps: float
    decode_tps: float


def _model(preset: str, seed: int):
    cfg = mc.ModelConfig.from_preset("minicpm4_0_5b" if preset == "0.5b" else
                                     "minicpm4_8b" if preset == "8b" else "tiny", sparse_config=None)
    return cfg, mc.init_params(cfg, jax.random.key(seed))


def llamacpp_speed(path: Path, prompt: Sequence[int], decode: Sequence[int], n_threads: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of llama.cpp on `path`; one warm-up pass first."""
    n_ctx = len(prompt) + len(decode) + 8
    llm = llamacpp.open_model(path, n_ctx=n_ctx, n_threads=n_threads, logits_all=False, f32_kv=False)
    llm.reset()
    llm.eval(list(prompt[:16]))                          # warm-up: thread pool, weight pages, graph allocation
    llm.eval([int(decode[0])])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(list(prompt))
    t1 = time.perf_counter()
    for tok in decode:
        llm.eval([int(tok)])
    t2 = time.perf_counter()
    del llm
    return len(prompt) / (t1 - t0), len(decode) / (t2 - t1)


def jax_decode_speed(cfg, params, prompt: Sequence[int], decode: Sequence[int]) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of the JAX model on CPU: jitted prefill, then jitted decode steps (over
    per-layer weights split once, as `generate` decodes on CPU)."""
    params = jax.jit(split_for_backend)(params)
    cap = -(-(len(prompt) + len(decode) + 1) // 16) * 16
    toks = jnp.asarray([list(prompt)], jnp.int32)
    lengths = jnp.asarray([len(prompt)], jnp.int32)

    def run(n_decode: int):
        cache = mc.init_cache(cfg, 1, cap)
        t0 = time.perf_counter()
        logits, cache = mc.prefill(params, cfg, toks, lengths, cache)
        logits.block_until_ready()
        t1 = time.perf_counter()
        for tok in decode[:n_decode]:
            logits, cache = mc.decode_step(params, cfg, jnp.asarray([[int(tok)]], jnp.int32), cache)
        jax.block_until_ready(logits)
        return t1 - t0, time.perf_counter() - t1

    run(2)                                               # compile prefill and decode_step
    prefill_s, decode_s = run(len(decode))
    return len(prompt) / prefill_s, len(decode) / decode_s


def run_edge_bench(preset: str = "0.5b", qtypes: Sequence[str] = ("f16", "q8_0", "q4_0"),
                   n_threads: Sequence[int] = (2,), prompt_len: int = 128, decode_tokens: int = 64,
                   out_dir: Optional[str] = None, seed: int = 0) -> str:
    """Run the benchmark and return the printed table (one row per qtype and llama.cpp thread count)."""
    cfg, params = _model(preset, seed)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(3, cfg.vocab_size, prompt_len).tolist()
    decode = rng.integers(3, cfg.vocab_size, decode_tokens).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(out_dir) if out_dir else Path(tmp)
        d.mkdir(parents=True, exist_ok=True)
        for q in qtypes:
            path = d / f"minicpm4-{preset}-random-{q}.gguf"
            t0 = time.perf_counter()
            rep = to_gguf(path, cfg, params, None, q, name=f"MiniCPM4-{preset}-random")
            export_s = time.perf_counter() - t0
            for nt in n_threads:
                pre, dec = llamacpp_speed(path, prompt, decode, nt)
                rows.append(EdgeRow(q, nt, rep.nbytes / 2**20, export_s, pre, dec))
            if not out_dir:
                path.unlink()
        jax_pre, jax_dec = jax_decode_speed(cfg, params, prompt, decode)
    extra = "on" if llamacpp.extra_buffers_work() else "OFF (AMX crashes here)"
    lines = [
        f"edge bench: MiniCPM4-{preset}-shaped random model ({cfg.param_count() / 1e6:.0f}M params, vocab "
        f"{cfg.vocab_size}), CPU with {os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f} at the end: other "
        f"processes slow OpenMP barriers), llama.cpp F16 KV cache, extra buffer types {extra}; prompt {prompt_len} "
        f"tokens, {decode_tokens} decode steps",
        f"JAX {jax.__version__} CPU float32 (same weights): prefill {jax_pre:.1f} tok/s, decode {jax_dec:.2f} tok/s",
        "",
        f"| {'qtype':6} | {'file MiB':>8} | {'export s':>8} | {'threads':>7} | {'llama.cpp prefill tok/s':>23} | "
        f"{'llama.cpp decode tok/s':>22} | {'JAX f32 decode tok/s':>20} | {'decode llama.cpp / JAX':>22} |",
        "|" + "|".join("-" * (w + 2) for w in (6, 8, 8, 7, 23, 22, 20, 22)) + "|",
    ]
    for r in rows:
        lines.append(f"| {r.qtype:6} | {r.file_mib:8.1f} | {r.export_s:8.1f} | {r.threads:7d} | {r.prefill_tps:23.1f} | "
                     f"{r.decode_tps:22.2f} | {jax_dec:20.2f} | {r.decode_tps / jax_dec:21.1f}x |")
    return "\n".join(lines)
