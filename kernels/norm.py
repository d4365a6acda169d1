"""Fused residual add + RMSNorm / LayerNorm.

One program per row: the row (and its residual) is read once, `x + residual` is written once
(the next residual) and normalised from registers, so a pre-norm block's `h = h + delta;
y = norm(h)` costs one pass over memory instead of three.

Rounding follows the torch paths the models use, so results agree with them in every dtype:
the sum is rounded to the input dtype (as `h + delta` in that dtype), statistics are float32,
RMSNorm rounds the normalised row to the input dtype before multiplying by the weight
(LlamaRMSNorm), LayerNorm rounds once at the end (F.layer_norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import check, check_device, check_float, next_pow2

MAX_ROW = 65536  # a row lives in registers; wider rows would spill


@triton.jit
def _norm_kernel(
    X,  # [M, N] input (the block's output `delta` when fusing the residual add)
    R,  # [M, N] residual or a dummy
    W,  # [N] weight or a dummy
    B,  # [N] bias or a dummy
    Y,  # [M, N] normalised output
    RES_OUT,  # [M, N] x + residual or a dummy
    N,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(RES_OUT.dtype.element_ty)  # rounded like `h + delta` in the model dtype
        tl.store(RES_OUT + row * N + cols, h, mask=mask)
        x = h.to(tl.float32)
    if IS_RMS:
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        y = x * rstd
        if HAS_W:
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            y = y.to(Y.dtype.element_ty).to(tl.float32) * w
    else:
        mean = tl.sum(x, axis=0) / N
        d = tl.where(mask, x - mean, 0.0)
        y = d * tl.math.rsqrt(tl.sum(d * d, axis=0) / N + eps)
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_float("x", x)
    check(x.is_contiguous(), f"x must be contiguous, got strides {x.stride()}")
    N = x.shape[-1]
    check(0 < N <= MAX_ROW, f"x: row length {N} not in 1..{MAX_ROW}")
    for name, t in (("w", w), ("b", b)):
        if t is not None:
            check(t.shape == (N,), f"{name}: shape {tuple(t.shape)} != ({N},)")
            check(t.dtype == x.dtype, f"{name}: dtype {t.dtype} != x dtype {x.dtype}")
            check(t.is_contiguous(), f"{name} must be contiguous")
    if residual is not None:
        check(residual.shape == x.shape, f"residual: shape {residual.shape} != x {x.shape}")
        check(residual.dtype == x.dtype, f"residual: dtype {residual.dtype} != x {x.dtype}")
        check(residual.is_contiguous(), "residual must be contiguous")
    check_device(_norm_kernel, x, w, b, residual)
    M = x.numel() // N
    y = torch.empty_like(x)
    new_res = torch.empty_like(x) if residual is not None else x
    if M == 0:
        return y, new_res
    BLOCK_N = next_pow2(N)
    _norm_kernel[(M,)](
        x,
        residual if residual is not None else x,
        w if w is not None else x,
        b if b is not None else x,
        y,
        new_res,
        N,
        float(eps),
        IS_RMS=is_rms,
        HAS_RES=residual is not None,
        HAS_W=w is not None,
        HAS_B=b is not None,
        BLOCK_N=BLOCK_N,
        num_warps=min(max(BLOCK_N // 512, 1), 16),
    )
    return y, new_res


def rms_norm(
    x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): h = x + residual (x itself when residual is None), y = RMSNorm(h) * w.

    x, residual [..., N] contiguous, w [N], all one float dtype; y and h have x's shape/dtype.
    """
    return _launch(x, w, None, eps, residual, is_rms=True)


def layer_norm(
    x: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): h = x + residual (x itself when residual is None), y = LayerNorm(h) * w + b.

    x, residual [..., N] contiguous; w, b [N] or None; all one float dtype.
    """
    return _launch(x, w, b, eps, residual, is_rms=False)


def rms_norm_ref(
    x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of rms_norm (the models' LlamaRMSNorm path)."""
    h = x if residual is None else x + residual
    hf = h.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return w * hf.to(h.dtype), h


def layer_norm_ref(
    x: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of layer_norm (F.layer_norm, as the models call it)."""
    h = x if residual is None else x + residual
    return F.layer_norm(h, (h.shape[-1],), w, b, eps), h
