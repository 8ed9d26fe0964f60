"""Pallas kernels. Each file holds a kernel beside the plain-JAX reference it must match; kernels import only JAX.

InfLLM v2 (MiniCPM4 trainable sparse attention), Triton lowering on GPU, interpret mode on CPU:
  infllm_v2_fwd.py     block-sparse attention forward over per-token block lists  (+ infllm_v2_fwd_reference)
  infllm_v2_bwd.py     dq and dk/dv (transposed block map) kernels, custom_vjp op    (+ infllm_v2_vjp_reference)
  infllm_v2_decode.py  split-K sparse decode over a KV cache                         (+ infllm_v2_decode_reference)
"""

from pallas_kernels.infllm_v2_bwd import infllm_v2_attention_pallas, infllm_v2_vjp_reference
from pallas_kernels.infllm_v2_decode import infllm_v2_decode_kernel, infllm_v2_decode_reference
from pallas_kernels.infllm_v2_fwd import infllm_v2_fwd, infllm_v2_fwd_reference

__all__ = ["infllm_v2_fwd", "infllm_v2_fwd_reference", "infllm_v2_attention_pallas", "infllm_v2_vjp_reference",
           "infllm_v2_decode_kernel", "infllm_v2_decode_reference"]
