"""Pallas kernels. Each file holds a kernel beside the plain-JAX reference it must match; kernels import only JAX.

InfLLM v2 (MiniCPM4 trainable sparse attention), Triton lowering on GPU, interpret mode on CPU:
  infllm_v2_fwd.py     block-sparse attention forward over per-token block lists  (+ infllm_v2_fwd_reference)
  infllm_v2_bwd.py     dq and dk/dv (transposed block map) kernels, custom_vjp op    (+ infllm_v2_vjp_reference)
  infllm_v2_decode.py  split-K sparse decode over a KV cache                         (+ infllm_v2_decode_reference)
The same three for TPU (Mosaic: scalar-prefetched block lists drive the K/V index_maps), checked against the same
references in interpret mode only (no TPU was available to compile or run them):
  infllm_v2_tpu_fwd.py, infllm_v2_tpu_bwd.py, infllm_v2_tpu_decode.py; layouts/padding in infllm_v2_tpu_common.py
"""

from pallas_kernels.infllm_v2_bwd import infllm_v2_attention_pallas, infllm_v2_vjp_reference
from pallas_kernels.infllm_v2_decode import infllm_v2_decode_kernel, infllm_v2_decode_reference
from pallas_kernels.infllm_v2_fwd import infllm_v2_fwd, infllm_v2_fwd_reference
from pallas_kernels.infllm_v2_tpu_bwd import infllm_v2_tpu_attention
from pallas_kernels.infllm_v2_tpu_decode import infllm_v2_tpu_decode_kernel
from pallas_kernels.infllm_v2_tpu_fwd import infllm_v2_tpu_fwd

__all__ = ["infllm_v2_fwd", "infllm_v2_fwd_reference", "infllm_v2_attention_pallas", "infllm_v2_vjp_reference",
           "infllm_v2_decode_kernel", "infllm_v2_decode_reference", "infllm_v2_tpu_fwd", "infllm_v2_tpu_attention",
           "infllm_v2_tpu_decode_kernel"]
