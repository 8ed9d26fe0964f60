"""Running a GGUF in llama.cpp through llama-cpp-python: logits, greedy decoding, tokenization, quantization, text.

Parity settings (edge-export.md §5, §6): `logits_all=True` so every position's logits are kept, an F32 KV cache
(`type_k = type_v = GGML_TYPE_F32`; the default F16 cache alone adds ~1e-3 error), and one thread (2-thread OpenMP
stalls of 0.3-0.6 s were seen on a busy 2-core box). `llama_cpp` is imported lazily: importing it takes ~1 s.

AMX: a `GGML_NATIVE=ON` build on a CPU that advertises AMX compiles ggml's AMX kernels, which run through llama.cpp's
"extra buffer types". In some VMs (seen on a Firecracker guest whose CPUID reports amx_tile/amx_int8) the tile
instructions raise SIGILL and kill the process at the first Q8_0/Q4_0/K-quant matmul. `extra_buffers_work()` runs
one such matmul in a child process once; when it dies, models are loaded with `use_extra_bufts = False` (no AMX and
no REPACK: correct, somewhat slower quantized matmuls). `MINICPM_LLAMACPP_EXTRA_BUFTS=0|1` skips the probe.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence

import gguf
import numpy as np

from minicpm_jax.export.qtypes import FILE_TYPE, LLAMACPP_QTYPES
from minicpm_jax.sampling import GenerationSettings

GGML_TYPE_F32 = 0
EXTRA_BUFTS_ENV = "MINICPM_LLAMACPP_EXTRA_BUFTS"
_patch_lock = threading.Lock()


def open_model(path: str | os.PathLike, *, n_ctx: int = 256, n_threads: int = 1, logits_all: bool = True,
               f32_kv: bool = True, seed: int = 0, verbose: bool = False, extra_buffers: Optional[bool] = None):
    """A `llama_cpp.Llama` for `path`. n_ctx is rounded up to a multiple of 256 by llama.cpp itself.

    extra_buffers: llama.cpp's extra weight buffer types (AMX, REPACK); None = on unless `extra_buffers_work()`
    finds they crash on this machine.
    """
    import llama_cpp   # ~1 s to import: only when llama.cpp runs

    check_gguf(path)
    if extra_buffers is None:
        extra_buffers = extra_buffers_work()
    kv = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if f32_kv else {}
    with _model_params(use_extra_bufts=extra_buffers):
        try:
            return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads,
                                   n_threads_batch=n_threads, logits_all=logits_all, seed=seed, verbose=verbose, **kv)
        except ValueError as e:
            raise ValueError(f"{path}: llama.cpp cannot load it ({e}); is it a GGUF written for the 'minicpm' "
                             "architecture by this llama.cpp version?") from None


def check_gguf(path: str | os.PathLike) -> dict:
    """Read a GGUF's header (cheap: memory-mapped) and return its metadata; a clear ValueError for a file that is
    missing, truncated or not GGUF, instead of llama.cpp's bare "Failed to load model from file"."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {p} does not exist" if not p.exists() else f"{p} is not a file")
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as e:   # gguf-py raises ValueError / struct errors / IndexError on damaged files
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ValueError(f"{p}: not a readable GGUF file ({why}); re-export it") from None
    meta = {}
    for name, field in reader.fields.items():
        if name.endswith("context_length") and field.types and field.data:
            meta["context_length"] = int(field.parts[field.data[0]][0])
    return meta


@contextlib.contextmanager
def _model_params(use_extra_bufts: bool):
    """llama-cpp-python 0.3.36 does not expose `use_extra_bufts`; its Llama() starts from
    `llama_model_default_params()`, so that function is wrapped for the duration of one constructor call."""
    import llama_cpp.llama_cpp as C   # ~1 s to import: only when llama.cpp runs

    if use_extra_bufts:
        yield
        return
    with _patch_lock:
        orig = C.llama_model_default_params

        def patched():
            p = orig()
            p.use_extra_bufts = False
            return p

        C.llama_model_default_params = patched
        try:
            yield
        finally:
            C.llama_model_default_params = orig


@functools.lru_cache(maxsize=None)
def extra_buffers_work() -> bool:
    """Whether a Q8_0 matmul through llama.cpp's extra buffer types (AMX / REPACK) runs here (child-process probe)."""
    env = os.environ.get(EXTRA_BUFTS_ENV)
    if env in ("0", "1"):
        return env == "1"
    with tempfile.TemporaryDirectory() as d:
        model = Path(d) / "probe-q8_0.gguf"
        _write_probe_model(model)
        code = ("import sys; from minicpm_jax.export import llamacpp as L; "
                "llm = L.open_model(sys.argv[1], extra_buffers=True); L.eval_logits(llm, list(range(1, 17)))")
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        r = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, env=env, timeout=300)
    if r.returncode != 0:

        logging.getLogger("minicpm_jax.export").warning(
            "llama.cpp's extra buffer types (AMX/REPACK) crash on this machine (probe exit code %d%s); loading "
            "models without them. Rebuild llama-cpp-python without AMX (e.g. GGML_NATIVE=OFF) for full speed.",
            r.returncode, ", SIGILL" if r.returncode in (-4, 132) else "")
    return r.returncode == 0


def _write_probe_model(path: Path) -> None:
    """A 1-layer, 256-wide random minicpm GGUF with Q8_0 matrices (llama.cpp's AMX kernels take Q8_0)."""

    rng = np.random.default_rng(0)
    h, f, v = 256, 512, 256
    w = gguf.GGUFWriter(path, "minicpm")
    for k, val in (("context_length", 256), ("embedding_length", h), ("block_count", 1),
                   ("feed_forward_length", f), ("head_count", 4), ("head_count_kv", 4)):
        getattr(w, f"add_{k}")(val)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(v)
    w.add_tokenizer_model("no_vocab")
    q8 = gguf.GGMLQuantizationType.Q8_0
    mats = {"token_embd.weight": (v, h), "blk.0.attn_q.weight": (h, h), "blk.0.attn_k.weight": (h, h),
            "blk.0.attn_v.weight": (h, h), "blk.0.attn_output.weight": (h, h), "blk.0.ffn_gate.weight": (f, h),
            "blk.0.ffn_up.weight": (f, h), "blk.0.ffn_down.weight": (h, f)}
    for name, shape in mats.items():
        w.add_tensor(name, gguf.quants.quantize(rng.normal(0, 0.05, shape).astype(np.float32), q8), raw_dtype=q8)
    for name in ("blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "output_norm.weight"):
        w.add_tensor(name, np.ones(h, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def eval_logits(llm, ids: Sequence[int]) -> np.ndarray:
    """float32 logits [len(ids), n_vocab] of every position, from a fresh context state."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def greedy(llm, ids: Sequence[int], n: int) -> list[int]:
    """n greedy tokens after `ids` (no EOS stop, no repeat penalty)."""
    out = []
    for tok in llm.generate(list(map(int, ids)), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def tokenize(llm, text: str, *, special: bool = True, add_bos: bool = False) -> list[int]:
    """llama.cpp's ids for `text` (special=True parses control-token strings such as `<|im_end|>`)."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))


def quantize(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, n_threads: Optional[int] = None) -> list[str]:
    """llama.cpp's own quantizer (`llama_model_quantize`), for the K-quants gguf-py cannot write.

    llama.cpp picks per-tensor types itself (Q4_K_M: Q4_K, with Q6_K for some attn_v/ffn_down and token_embd) and
    falls back for rows that are not a multiple of 256 (e.g. Q4_K -> Q5_0, Q6_K -> Q8_0). Its log is captured; the
    fallback lines are returned (and logged as warnings).
    """
    import llama_cpp   # ~1 s to import: only when llama.cpp runs


    if qtype not in LLAMACPP_QTYPES:
        raise ValueError(f"llama.cpp quantization type {qtype!r} is not one of {LLAMACPP_QTYPES}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FILE_TYPE[qtype])        # gguf's LlamaFileType == llama.cpp's LLAMA_FTYPE_* values
    params.nthread = int(n_threads or 0)        # 0: llama.cpp uses the hardware concurrency
    with _llama_log() as log_lines:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    text = "".join(log_lines)
    if rc != 0 or not Path(dst).exists():
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {qtype}) failed with code {rc}:\n"
                           + "\n".join(text.splitlines()[-20:]))

    fallbacks = [" ".join(line.replace("warning:", "").split()) for line in text.splitlines()
                 if "falling back" in line]
    for line in fallbacks:
        logging.getLogger("minicpm_jax.export").warning("llama.cpp quantizer: %s", line)
    return fallbacks


@contextlib.contextmanager
def _llama_log():
    """Collect llama.cpp's log lines (instead of llama-cpp-python's stderr printer) for the block: yields the list
    that receives them."""

    import llama_cpp   # ~1 s to import: only when llama.cpp runs
    import llama_cpp._logger as default_logger   # ~1 s to import: only when llama.cpp runs

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(default_logger.llama_log_callback, ctypes.c_void_p(0))


def generate_text(path: str | os.PathLike, *, prompt: Optional[str], prompt_ids: Optional[Sequence[int]],
                  max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int, chat: bool,
                  n_threads: Optional[int] = None, truncate_prompt: bool = False) -> str:
    """Generate text from a GGUF with the file's own tokenizer and chat template (`minicpm generate --gguf`).

    The settings mean what they mean for the JAX path (`GenerationSettings`: temperature 0 = greedy, top_k 0 and
    top_p 1 = off); a prompt that does not fit the model's context with max_new_tokens is refused (or its oldest
    tokens dropped with truncate_prompt)."""
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("give exactly one of prompt (text) or prompt_ids (token ids)")
    settings = GenerationSettings(max_new_tokens, float(temperature), int(top_k), float(top_p))
    ctx = check_gguf(path).get("context_length", 4096)
    # a context just large enough (llama.cpp sizes its buffers by n_ctx): <= 1 token per prompt byte, plus BOS and
    # a chat template's own tokens
    need = (len(prompt_ids) if prompt_ids is not None else len(prompt.encode("utf-8")) + 2 + 64 * chat)
    llm = open_model(path, n_ctx=max(16, min(ctx, need + max_new_tokens)), n_threads=n_threads or os.cpu_count() or 1,
                     logits_all=False, f32_kv=False, seed=seed)
    if llm.metadata.get("tokenizer.ggml.model") == "no_vocab":
        raise ValueError(f"{path} has no tokenizer ('no_vocab'); re-export it with a tokenizer (--tokenizer)")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=0.0, repeat_penalty=1.0, seed=seed)
    if prompt is not None and not chat:
        prompt_ids = tokenize(llm, prompt, special=True, add_bos=True)
    if prompt_ids is not None:
        if chat:
            raise ValueError("chat=True needs a text prompt (the chat template renders text), not prompt_ids")
        prompt_ids = list(map(int, prompt_ids))
        prompt_ids = prompt_ids[settings.fit_prompt(len(prompt_ids), ctx, truncate_prompt):]
        out = llm.create_completion(prompt_ids, max_tokens=max_new_tokens, **sampling)
        return out["choices"][0]["text"]
    if chat:
        if not llm.metadata.get("tokenizer.chat_template"):
            raise ValueError(f"{path} has no tokenizer.chat_template; run without chat")
        out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=max_new_tokens,
                                         **sampling)
        return out["choices"][0]["message"]["content"] or ""
