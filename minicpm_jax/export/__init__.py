"""Export to edge runtimes: GGUF for llama.cpp (f32 ... q4_0, ternary TQ1_0/TQ2_0, q4_k_m) and HF safetensors.

    from minicpm_jax import export
    w = minicpm_jax.weights.load_weights("runs/tiny")           # or an HF checkpoint directory
    export.to_gguf("m-q8_0.gguf", w.cfg, w.params, w.tokenizer, qtype="q8_0")
    export.export_hf("hf_out", w.cfg, w.params, w.tokenizer)

Modules: gguf (writer), weights (tensor names, q/k permutation, ternary values), qtypes (per-tensor types and
fallbacks), gguf_tokenizer (SentencePiece -> llama.cpp vocabulary), gguf_read (dequantized read-back, ternary export
error), llamacpp (running a GGUF via llama-cpp-python), hf_export. Export imports the model, never the trainer; where
weights come from is decided by `minicpm_jax.weights`. Conventions and their verification: shared/docs/edge-export.md.
"""

from minicpm_jax.export.gguf import GGUFExport, to_gguf
from minicpm_jax.export.gguf_read import reference_model, ternary_export_error
from minicpm_jax.export.hf_export import export_hf
from minicpm_jax.export.qtypes import ALL_QTYPES, QTYPES

__all__ = ["to_gguf", "GGUFExport", "export_hf", "reference_model", "ternary_export_error", "QTYPES", "ALL_QTYPES"]
