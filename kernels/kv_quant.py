"""int8 KV cache: symmetric quantization per (row, kv head, token), one Triton kernel on CUDA.

Layout (what kernels.decode_attention reads with k_scale / v_scale):
    k, v              int8    [B, Hkv, T_max, D]   q in [-127, 127]
    k_scale, v_scale  float32 [B, Hkv, T_max]      x ~= q * scale, scale = absmax / 127 over D

quantize_kv(x) -> (q, scale) for x [..., D] (the tokens being written): quantize_kv_triton (one
launch, one read of x and one write of q and scale) on CUDA with compiled Triton, the torch
reference quantize_kv_ref otherwise. dequantize_kv(q, scale, dtype) -> x' [..., D].

Arithmetic (both paths, bit-identical): absmax over D in float32 (exact), scale = absmax / 127,
q = round_half_even(clamp(x / s, -127, 127)) with s = scale (1 for an all-zero row: scale 0,
q 0), both divisions correctly rounded float32 (torch's `/`, tl.math.div_rn in the kernel:
Triton's own `/` is the approximate div.full.f32 on the GPU). The rounded quotient bounds the
error by |x - dequantize_kv(q, scale, float64)| <= scale / 2 * (1 + 2^-17): a quotient within
half an ulp (<= 2^-18 below 128) of a half-integer may round onto it and then to the far side.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import cdiv, check, check_device, interpreting, next_pow2, num_sms

QMAX = 127
CHUNK = 1 << 24  # elements per slice of the reference (float32 temporaries <= 2 x 64 MiB)
MAX_LEAD = 3  # leading dims the kernel indexes with their own strides (after merging)


@triton.jit
def _quantize_kv_kernel(
    X,  # [n0, n1, n2, D] through strides (sx0, sx1, sx2, 1)
    Q,  # int8 [M, D] contiguous, M = n0 * n1 * n2
    S,  # float32 [M]
    M,
    D,
    n1,
    n2,
    sx0,
    sx1,
    sx2,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows, in x's leading-dim order
    rm = r < M
    i2 = r % n2
    i1 = (r // n2) % n1
    i0 = r // (n2 * n1)
    xo = i0.to(tl.int64) * sx0 + i1.to(tl.int64) * sx1 + i2.to(tl.int64) * sx2
    d = tl.arange(0, BLOCK_D)
    mask = rm[:, None] & (d < D)[None, :]
    x = tl.load(X + xo[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), tl.full([BLOCK_M], 127.0, tl.float32))
    s = tl.where(scale > 0, scale, 1.0)  # all-zero row: 0 / 1 -> q 0
    t = tl.math.div_rn(x, tl.broadcast_to(s[:, None], [BLOCK_M, BLOCK_D]))
    t = tl.minimum(tl.maximum(t, -127.0), 127.0)
    # Round half to even as torch.round: t + 1.5 * 2^23 (|t| <= 2^22) rounds t to an integer in
    # the float's mantissa; its bits minus those of 1.5 * 2^23 are that integer (an integer
    # subtraction, which no float re-association can fold away).
    q = (t + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    qo = r.to(tl.int64)[:, None] * D + d[None, :]
    tl.store(Q + qo, q.to(tl.int8), mask=mask)
    tl.store(S + r, scale, mask=rm)


def _lead_dims(x: torch.Tensor) -> list[tuple[int, int]] | None:
    """x's leading dims as (size, stride) pairs, size-1 dims dropped and adjacent dims merged
    where one stride spans both; None if more than MAX_LEAD remain."""
    dims: list[tuple[int, int]] = []
    for n, st in zip(x.shape[:-1], x.stride()[:-1], strict=True):
        if n == 1:
            continue
        if dims and dims[-1][1] == st * n:
            dims[-1] = (dims[-1][0] * n, st)
        else:
            dims.append((n, st))
    return dims if len(dims) <= MAX_LEAD else None


def quantize_kv_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_kv in one Triton launch; x [..., D] float32/float16/bfloat16 on CUDA (or CPU
    under TRITON_INTERPRET=1). Any leading strides with unit stride on D are read in place
    (e.g. the [B, H, S, D] transpose of a [B, S, H, D] projection: 3 leading dims); otherwise
    (D strided, or more than 3 leading dims that do not merge) x is copied by .contiguous().
    Returns q int8 [..., D] and scale float32 [...], both contiguous."""
    check(
        x.dtype in (torch.float32, torch.float16, torch.bfloat16),
        f"x: dtype {x.dtype} is not float32/float16/bfloat16",
    )
    check(x.dim() >= 1 and x.shape[-1] > 0, f"x: shape {tuple(x.shape)} has no last dim")
    check_device(_quantize_kv_kernel, x)
    D = x.shape[-1]
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    M = scale.numel()
    if M == 0:
        return q, scale
    dims = _lead_dims(x) if x.stride(-1) == 1 or D == 1 else None
    if dims is None:  # strided D or > MAX_LEAD leading dims: one copy, then a single row stride
        x = x.contiguous()
        dims = [(M, D)]
    dims = [(1, 0)] * (MAX_LEAD - len(dims)) + dims
    (_, s0), (n1, s1), (n2, s2) = dims
    BLOCK_D = next_pow2(D)
    # ~4096 elements per program, fewer rows while that leaves under two programs per SM.
    BLOCK_M = max(1, 4096 // BLOCK_D)
    while BLOCK_M > 1 and cdiv(M, BLOCK_M) < 2 * num_sms(x.device):
        BLOCK_M //= 2
    _quantize_kv_kernel[(cdiv(M, BLOCK_M),)](
        x, q, scale, M, D, n1, n2, s0, s1, s2,
        BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=4 if BLOCK_M * BLOCK_D >= 2048 else 2,
    )  # fmt: skip
    return q, scale


def quantize_kv_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of quantize_kv (float32 arithmetic, bit-identical to the kernel). Inputs
    of more than CHUNK elements are processed in slices along the first dimension, so the
    float32 temporaries stay <= 2 x 4 * CHUNK bytes."""
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
    s = torch.where(scale > 0, scale, 1.0)[..., None]  # 0 / 1 -> q 0 for zero vectors
    t = torch.div(x.float(), s).round_().clamp_(-QMAX, QMAX)  # a new tensor (x untouched)
    q.copy_(t)


# Decided once, as Triton decides at decoration time whether the kernel is compiled.
_COMPILED = not interpreting()


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (q int8 [..., D], scale float32 [...]), x ~= q * scale[..., None].

    The Triton kernel for CUDA tensors of float32/float16/bfloat16 when Triton is compiled (not
    interpreting), quantize_kv_ref otherwise; the two give identical results."""
    if x.is_cuda and _COMPILED and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return quantize_kv_triton(x)
    return quantize_kv_ref(x)


def dequantize_kv(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """q int8 [..., D], scale float32 [...] -> q * scale in dtype (float32 arithmetic; float64
    when dtype is float64)."""
    check(q.dtype == torch.int8, f"q: dtype {q.dtype} != int8")
    check(scale.shape == q.shape[:-1], f"scale: shape {tuple(scale.shape)} != {q.shape[:-1]}")
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    return (q.to(ct) * scale.to(ct)[..., None]).to(dtype)


def cache_prefix(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    end: int | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of cache indices [0, end) (all of them when end is None) in `dtype`:
    caches [B, Hkv, T_max, D], int8 ones dequantized with their scales [B, Hkv, T_max]."""
    k, v = k_cache[:, :, :end], v_cache[:, :, :end]
    if k_cache.dtype == torch.int8:
        check(k_scale is not None and v_scale is not None, "int8 caches need k_scale, v_scale")
        assert k_scale is not None and v_scale is not None
        k = dequantize_kv(k, k_scale[:, :, :end], dtype)
        v = dequantize_kv(v, v_scale[:, :, :end], dtype)
    return k.to(dtype), v.to(dtype)
