"""Rotary position embedding applied to q and k in place, in one launch.

Convention: "rotate_half" (non-interleaved), as transformers' Llama, Mistral, Qwen2 and
GPT-NeoX apply it: with R = rotary_dim and x1 = x[:R/2], x2 = x[R/2:R],
    x[:R/2] <- x1 * cos[:R/2] - x2 * sin[:R/2]
    x[R/2:R] <- x2 * cos[R/2:] + x1 * sin[R/2:]
and channels R..D untouched (partial rotary, e.g. GPT-NeoX rotary_pct < 1).

Layout: q [B, S, H, D] and k [B, S, Hkv, D] with unit stride on D and any other strides, so a
[B, H, S, D] tensor is passed as its view `t.transpose(1, 2)` (no copy). cos, sin [B, S, R]
(unit stride on R; expand() a [1, S, R] table to broadcast it over the batch).
The arithmetic is float32 with one rounding per output element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import check, check_device, check_float, next_pow2


@triton.jit
def _rotate_heads(
    X,  # base pointer of this token's heads: X[h * stride_h + d]
    stride_h,
    n_heads,
    c1,  # [1, HALF] float32 cos/sin of the two halves
    c2,
    s1,
    s2,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    d = tl.arange(0, BLOCK_HALF)[None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
        mask = (h < n_heads) & (d < half)
        p1 = X + h * stride_h + d  # [BLOCK_H, BLOCK_HALF]
        x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(p1, (x1 * c1 - x2 * s1).to(X.dtype.element_ty), mask=mask)
        tl.store(p1 + half, (x2 * c2 + x1 * s2).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q,
    K,
    COS,
    SIN,
    S,
    n_q_heads,
    n_k_heads,
    half,  # R / 2
    sqb,
    sqs,
    sqh,
    skb,
    sks,
    skh,
    scb,
    scs,
    ssb,
    sss,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    # One program per token (b, s): its cos/sin row is read once and used by every q and k head.
    tok = tl.program_id(0)
    b = (tok // S).to(tl.int64)
    s = (tok % S).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)[None, :]
    dm = d < half
    cp = COS + b * scb + s * scs + d
    sp = SIN + b * ssb + s * sss + d
    c1 = tl.load(cp, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(cp + half, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(sp, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(sp + half, mask=dm, other=0.0).to(tl.float32)
    _rotate_heads(Q + b * sqb + s * sqs, sqh, n_q_heads, c1, c2, s1, s2, half, BLOCK_H, BLOCK_HALF)
    _rotate_heads(K + b * skb + s * sks, skh, n_k_heads, c1, c2, s1, s2, half, BLOCK_H, BLOCK_HALF)


def apply_rotary_(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, S, H, D] and k [B, S, Hkv, D] in place by cos, sin [B, S, R]; returns (q, k).

    R <= D and even; only the first R channels of each head change.
    """
    check(q.dim() == 4 and k.dim() == 4, f"q, k must be [B, S, H, D]: {q.shape}, {k.shape}")
    B, S, H, D = q.shape
    check(
        k.shape[:2] == (B, S) and k.shape[3] == D,
        f"k: shape {tuple(k.shape)} does not match q {tuple(q.shape)} in B, S, D",
    )
    check(cos.shape == sin.shape, f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    check(cos.dim() == 3 and cos.shape[:2] == (B, S), f"cos: shape {tuple(cos.shape)} != [B, S, R]")
    R = cos.shape[2]
    check(R % 2 == 0 and 0 < R <= D, f"rotary dim {R} must be even and in 2..{D}")
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(name, t)
        check(t.stride(-1) == 1, f"{name}: last dim must have unit stride, strides {t.stride()}")
    check(k.dtype == q.dtype, f"k dtype {k.dtype} != q dtype {q.dtype}")
    check_device(_rotary_kernel, q, k, cos, sin)
    if B * S == 0:
        return q, k
    BLOCK_HALF = next_pow2(R // 2)
    _rotary_kernel[(B * S,)](
        q,
        k,
        cos,
        sin,
        S,
        H,
        k.shape[2],
        R // 2,
        *q.stride()[:3],
        *k.stride()[:3],
        *cos.stride()[:2],
        *sin.stride()[:2],
        BLOCK_H=max(1, min(next_pow2(max(H, k.shape[2])), 4096 // BLOCK_HALF)),
        BLOCK_HALF=BLOCK_HALF,
        num_warps=4,
    )
    return q, k


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of apply_rotary_ (same layout, in place), the models' rotate_half math."""
    R = cos.shape[-1]
    c, s = cos[:, :, None], sin[:, :, None]  # [B, S, 1, R]
    for x in (q, k):
        xr = x[..., :R]
        x1, x2 = xr[..., : R // 2], xr[..., R // 2 :]
        xr.copy_(xr * c + torch.cat((-x2, x1), dim=-1) * s)
    return q, k
