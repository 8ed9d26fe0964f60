"""The lm-evaluation-harness backend on an exported GGUF: `minicpm_gguf`, the model run by llama.cpp.

    import lm_eval, minicpm_jax.evals                       # importing the package registers "minicpm_gguf"
    lm_eval.simple_evaluate(model="minicpm_gguf", model_args="pretrained=runs/tiny/export/model-q8_0.gguf",
                            tasks=["minicpm_cloze_en"], task_manager=minicpm_jax.evals.task_manager())

The same requests as `minicpm_jax` (`harness.py`), answered by llama.cpp through llama-cpp-python, so a task scores
the JAX model and its exports on the same items and the difference is what the export (quantization) costs.
Tokenization is the GGUF's own (`llama_tokenizer.LlamaCppTokenizer`); requests are read and truncated exactly as the
JAX backend reads them (`lm_common`, `scoring.truncate_request`).

Model arguments:
  pretrained    the .gguf file
  max_length    the window for scoring and generation, = llama.cpp's n_ctx (default: the file's context_length,
                at most 8192: every position's logits are kept, n_ctx x n_vocab float32)
  max_gen_toks  default generation budget when a task sets none (256)
  n_threads     llama.cpp threads (default: all cores)
  add_bos_token prepend BOS to every context (default true, as the JAX backend)
  seed          sampling seed for tasks that sample (greedy tasks ignore it)
  batch_size    accepted for a uniform command line; llama-cpp-python's `Llama` decodes one sequence, so "batched"
                here means every prompt in one llama_decode call (n_batch = n_ctx) and the KV cache of the longest
                common prefix kept between consecutive requests, which are ordered so that requests sharing a
                context (multiple choice) follow each other

Settings for parity with JAX (edge-export.md §5): an F32 KV cache and the logits of every position. Generation is
greedy (or llama.cpp's sampler when a task samples) and stops at a stop string or at the file's end-of-generation
tokens (llama.cpp's EOG set: EOS and, with ChatML, <|im_end|>), as the runtime stops.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import gguf
import numpy as np
from lm_eval.api.registry import register_model
from tqdm import tqdm

from minicpm_jax.evals.generation import cut_at_stop
from minicpm_jax.evals.llama_tokenizer import LlamaCppTokenizer
from minicpm_jax.evals.lm_common import TokenizerLM, generation_groups, positive_int
from minicpm_jax.evals.scoring import truncate_request
from minicpm_jax.export.llamacpp import check_gguf, open_model

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 8192


def file_type_name(llm) -> str:
    """The file's weight type as gguf names it (ALL_F32, MOSTLY_Q8_0, ...), or "unknown"."""
    ft = llm.metadata.get("general.file_type")
    try:
        return gguf.LlamaFileType(int(ft)).name
    except (TypeError, ValueError):
        return "unknown"


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(diff[0]) if diff.size else n


@register_model("minicpm_gguf")
class GGUFLM(TokenizerLM):
    """An lm-eval LM over a GGUF file run by llama.cpp (llama-cpp-python)."""

    backend = "causal"

    def __init__(self, pretrained: Optional[str] = None, max_length: Optional[int] = None, max_gen_toks: int = 256,
                 n_threads: Optional[int] = None, add_bos_token: bool = True, seed: int = 0,
                 batch_size: int | str = 1, max_batch_size: Optional[int] = None, device: Optional[str] = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"minicpm_gguf: unknown model arguments {sorted(unknown)}; known: pretrained, "
                             "max_length, max_gen_toks, n_threads, add_bos_token, seed, batch_size")
        if not pretrained:
            raise ValueError("minicpm_gguf: give pretrained=<file.gguf>")
        self.path = Path(pretrained)
        meta = check_gguf(self.path)            # missing / truncated / not GGUF: an error that names the file
        self.max_gen_toks = positive_int("minicpm_gguf", "max_gen_toks", max_gen_toks)
        self.batch_size = 1 if batch_size == "auto" else positive_int("minicpm_gguf", "batch_size", batch_size)
        ctx = meta.get("context_length", DEFAULT_MAX_LENGTH)
        self._max_length = (positive_int("minicpm_gguf", "max_length", max_length, allow_none=True)
                            or min(ctx, DEFAULT_MAX_LENGTH))
        if self._max_length > ctx:
            raise ValueError(f"minicpm_gguf: max_length={self._max_length} exceeds {self.path}'s context_length={ctx}")
        threads = positive_int("minicpm_gguf", "n_threads", n_threads, allow_none=True) or os.cpu_count() or 1
        self.llm = open_model(self.path, n_ctx=self._max_length, n_threads=threads, logits_all=True, f32_kv=True,
                              seed=int(seed))
        if self.llm.metadata.get("tokenizer.ggml.model") == "no_vocab":
            raise ValueError(f"{self.path} has no tokenizer ('no_vocab'); re-export it with a tokenizer")
        self.tokenizer = LlamaCppTokenizer(self.llm, self.path)
        self.add_bos_token = bool(add_bos_token)
        self.seed = int(seed)
        self.file_type = file_type_name(self.llm)
        self.n_threads = threads
        log.info("minicpm_gguf: %s (%s), n_ctx %d", self.path, self.file_type, self._max_length)

    @property
    def source(self) -> str:
        """The GGUF file (lm-eval task builders read it as `pretrained`)."""
        return str(self.path)

    @property
    def tokenizer_name(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------------ llama.cpp state
    def _logits(self, ids: list[int]) -> np.ndarray:
        """float32 logits [len(ids), n_vocab] for every position of `ids`; the KV cache (and the logits rows) of the
        prefix shared with the previous call are kept, only the rest is decoded."""
        llm = self.llm
        keep = _common_prefix(llm.input_ids[:llm.n_tokens], ids)
        llm.n_tokens = keep                     # eval() drops the KV cache from n_tokens on
        if keep < len(ids):
            llm.eval(ids[keep:])
        return llm.scores[:len(ids)]

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) strings or None, context ids, continuation ids)."""
        rows = [truncate_request(c, x, self.max_length) + (list(x),) for _, c, x in requests]
        # lexicographic order of the whole input puts requests that share a context next to each other
        order = sorted(range(len(rows)), key=lambda i: rows[i][0] + rows[i][2])
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="minicpm_gguf loglikelihood")
        for i in order:
            inp, start, cont = rows[i]
            logits = np.asarray(self._logits(inp)[start:start + len(cont)], np.float64)
            lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
            lp = logits[np.arange(len(cont)), cont] - lse
            out[i] = (float(lp.sum()), bool((logits.argmax(-1) == np.asarray(cont)).all()))
            bar.update(1)
        bar.close()
        return self._cache_loglikelihoods(requests, out)

    # ------------------------------------------------------------------ generation
    def _generate_one(self, prompt: list[int], until: list[str], max_gen: int, temperature: float, top_k: int,
                      top_p: float) -> str:
        """As `generation.generate_until` for one row: stop when the decoded text contains a stop string or at an
        end-of-generation token; the text is cut before the first stop string."""
        out: list[int] = []
        for tok in self.llm.generate(prompt, temp=temperature, top_k=top_k, top_p=top_p, min_p=0.0,
                                     repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if int(tok) in self.tokenizer.eog_ids or (until and cut_at_stop(self.tok_decode(out), until)[1]):
                break
            if len(out) == max_gen:
                break
        text_ids = [t for t in out if t not in self.tokenizer.eog_ids]
        return cut_at_stop(self.tok_decode(text_ids), until)[0]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation kwargs; within a group in prompt order (shared prefixes reuse the KV
        cache)."""
        out: list[Optional[str]] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="minicpm_gguf generate_until")
        for g in generation_groups(requests, self.max_gen_toks, self.max_length, "minicpm_gguf"):
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - g.max_gen)
                       for i in g.members}
            if g.temperature > 0:
                self.llm.set_seed(self.seed)
            for i in sorted(g.members, key=lambda i: prompts[i]):
                out[i] = self._generate_one(prompts[i], g.until, g.max_gen, g.temperature, g.top_k, g.top_p)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(1)
        bar.close()
        return out

    def get_model_info(self) -> dict:
        return {"model_source": f"GGUF {self.path} ({self.file_type})", "backend": "minicpm_gguf",
                "file_type": self.file_type, "max_length": self.max_length, "n_threads": self.n_threads}
