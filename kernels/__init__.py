"""Fused Triton kernels, each with a torch reference of the same signature (`<name>_ref`).

Callers pick the kernel when HAS_TRITON_GPU and the tensors are on CUDA, the reference
otherwise; both give the same results within the dtype's rounding (tests/kernels).
"""

from __future__ import annotations

import torch

from kernels._common import interpreting
from kernels.act import (
    act_mul,
    act_mul_fused,
    act_mul_fused_ref,
    act_mul_ref,
    activation,
    activation_ref,
)
from kernels.attention import decode_attention, decode_attention_ref
from kernels.kv_quant import dequantize_kv, quantize_kv, quantize_kv_ref, quantize_kv_triton
from kernels.norm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
from kernels.pinned_copy import copy_from_pinned, copy_from_pinned_ref
from kernels.qmatmul import QConfig, dequantize_into, qmatmul, qmatmul_ref
from kernels.quant import dequantize, error_bound, pack_int4, quant_info, quantize, unpack_int4
from kernels.rotary import apply_rotary_, apply_rotary_ref

# Compiled kernels can run: a CUDA device, and Triton not in its CPU interpreter mode.
HAS_TRITON_GPU: bool = torch.cuda.is_available() and not interpreting()

__all__ = [
    "HAS_TRITON_GPU",
    "QConfig",
    "act_mul",
    "act_mul_fused",
    "act_mul_fused_ref",
    "act_mul_ref",
    "activation",
    "activation_ref",
    "apply_rotary_",
    "apply_rotary_ref",
    "copy_from_pinned",
    "copy_from_pinned_ref",
    "decode_attention",
    "decode_attention_ref",
    "dequantize",
    "dequantize_into",
    "dequantize_kv",
    "error_bound",
    "layer_norm",
    "layer_norm_ref",
    "pack_int4",
    "qmatmul",
    "qmatmul_ref",
    "quant_info",
    "quantize",
    "quantize_kv",
    "quantize_kv_ref",
    "quantize_kv_triton",
    "rms_norm",
    "rms_norm_ref",
    "unpack_int4",
]
