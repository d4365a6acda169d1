"""int8 KV cache: symmetric quantization per (row, kv head, token), plain torch.

Layout (what kernels.decode_attention reads with k_scale / v_scale):
    k, v              int8    [B, Hkv, T_max, D]   q in [-127, 127]
    k_scale, v_scale  float32 [B, Hkv, T_max]      x ~= q * scale, scale = absmax / 127 over D

quantize_kv(x) -> (q, scale) for x [..., D] (the tokens being written); dequantize_kv(q, scale,
dtype) -> x' [..., D]. |x - dequantize_kv(q, scale, float64)| <= scale / 2 holds elementwise
(rounding to nearest, no clipping: |x| <= absmax = 127 * scale up to the scale's own rounding,
which the clamp absorbs); an all-zero vector gets scale 0 and q 0.

The division x / scale is done in float64: in float32 a quotient within 2^-17 of a half-integer
may round across it and break the bound by ~1e-5 * scale. Inputs of more than CHUNK elements
are processed in slices along the first dimension, so the float64 temporaries stay <= 8 * CHUNK
bytes (a 32-row prefill write of OPT-30B would otherwise need ~1 GB of them).
"""

from __future__ import annotations

import torch

from kernels._common import check

QMAX = 127
CHUNK = 1 << 24  # elements per slice of the float64 division (128 MiB of temporaries)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (q int8 [..., D], scale float32 [...]), x ~= q * scale[..., None]."""
    check(x.is_floating_point(), f"x: dtype {x.dtype} is not a float")
    check(x.dim() >= 1 and x.shape[-1] > 0, f"x: shape {tuple(x.shape)} has no last dim")
    scale = x.abs().amax(-1).float() / QMAX  # [...] float32 (absmax exact in float32)
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    if x.dim() == 1 or x.numel() <= CHUNK:
        _quantize_into(q, x, scale)
    else:
        step = max(1, CHUNK // (x.numel() // x.shape[0]))
        for i in range(0, x.shape[0], step):
            _quantize_into(q[i : i + step], x[i : i + step], scale[i : i + step])
    return q, scale


def _quantize_into(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor) -> None:
    s = torch.where(scale > 0, scale, 1.0).double()[..., None]  # 0 / 1 -> q 0 for zero vectors
    t = x.double().div_(s).round_().clamp_(-QMAX, QMAX)
    q.copy_(t)


def dequantize_kv(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """q int8 [..., D], scale float32 [...] -> q * scale in dtype (float32 arithmetic; float64
    when dtype is float64)."""
    check(q.dtype == torch.int8, f"q: dtype {q.dtype} != int8")
    check(scale.shape == q.shape[:-1], f"scale: shape {tuple(scale.shape)} != {q.shape[:-1]}")
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(ct) * scale.to(ct)[..., None]).to(dtype)
