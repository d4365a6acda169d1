"""Group-wise weight-only quantization of a linear weight W [N, K] (N outputs, K inputs).

Each row is cut into groups of G consecutive input channels (G = group_size, default 64; K must
be a multiple of G, G even and a power of two). Every group has its own scale, so an outlier
only costs precision within its 64 weights.

Schemes and what a checkpoint stores per weight (the packed layout is part of the format):

  int8 "sym"    qweight int8 [N, K]         q in [-127, 127]         w = q * s
  int4 "sym"    qweight uint8 [N, K // 2]   u in [1, 15], zero 8     w = (u - 8) * s
  int4 "asym"   qweight uint8 [N, K // 2]   u in [0, 15]             w = (u - z) * s
                zeros [K // G, N]           z in [0, 15], stored in scale_dtype
  every scheme  scales [K // G, N] in scale_dtype (default float16)

Scales and zeros are group-major ([K // G, N], as GPTQ stores them): one group's values for
consecutive output channels are adjacent, so a kernel tile of output channels reads them with
one vector load per group. Zeros are small integers kept in the scales' dtype (exact): a
2-byte element lets the GPU fetch them asynchronously like the scales, which 1-byte elements
do not allow (+1/64 byte per weight at G = 64).

int4 packing, "half-split within a group": the G/2 bytes of group g of row n hold
    low nibble of byte i  = u[n, g*G + i]
    high nibble of byte i = u[n, g*G + G/2 + i]          for i in [0, G/2)
i.e. qweight[n, g*G/2 + i] = u[n, g*G + i] | (u[n, g*G + G/2 + i] << 4). A kernel unpacks a run
of bytes into two runs of consecutive input channels (no interleaving shuffle), and a row of
groups is still one contiguous run of bytes.

Scales: sym s = absmax / qmax (qmax 127 or 7); asym s = (max(hi, 0) - min(lo, 0)) / 15 and
z = round(-min(lo, 0) / s), so zero is exact in every scheme. Scales are rounded UP to
scale_dtype and floored at its smallest normal number, so that |w - dequant| <= s / 2 holds
with the stored s (no clipping) and an all-zero group stays all zero.
"""

from __future__ import annotations

import torch

from kernels._common import check

SCHEMES = {8: ("sym",), 4: ("sym", "asym")}


def _round_up_to(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """s float32 >= 0 -> dtype, never below s and never below dtype's smallest normal number."""
    out = s.clamp(min=torch.finfo(dtype).tiny).to(dtype)
    if dtype != torch.float32:
        # Positive floats: the next bit pattern is the next representable number.
        low = out.float() < s
        out.view(torch.int16)[low] += 1
    return out


def quantize(
    w: torch.Tensor,
    bits: int,
    group_size: int = 64,
    scheme: str = "sym",
    scale_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """w [N, K] float -> {"qweight", "scales"} (+ "zeros" for asym), layout in the module doc."""
    check(w.dim() == 2, f"w: expected [N, K], got shape {tuple(w.shape)}")
    check(bits in SCHEMES, f"bits: {bits} not in {sorted(SCHEMES)}")
    check(scheme in SCHEMES[bits], f"scheme: {scheme!r} not available for int{bits}")
    G = group_size
    N, K = w.shape
    check(G >= 2 and G & (G - 1) == 0, f"group_size {G} must be a power of two >= 2")
    check(K % G == 0, f"w: input dim {K} is not a multiple of group_size {G}")
    check(scale_dtype in (torch.float16, torch.bfloat16, torch.float32), "scale_dtype")
    check(bool(torch.isfinite(w).all()), "w has non-finite values")
    wg = w.float().reshape(N, K // G, G)  # [N, groups, G]
    out: dict[str, torch.Tensor] = {}
    if scheme == "sym":
        qmax = 127 if bits == 8 else 7
        s = _round_up_to(wg.abs().amax(-1) / qmax, scale_dtype)  # [N, groups]
        q = torch.round(wg / s.float()[..., None]).clamp(-qmax, qmax)
        if bits == 8:
            return {"qweight": q.to(torch.int8).reshape(N, K), "scales": s.t().contiguous()}
        u = (q + 8).to(torch.uint8)
    else:
        lo = wg.amin(-1).clamp(max=0)
        hi = wg.amax(-1).clamp(min=0)
        s = _round_up_to((hi - lo) / 15, scale_dtype)
        z = torch.round(-lo / s.float()).clamp(0, 15)  # [N, groups]
        u = (torch.round(wg / s.float()[..., None]) + z[..., None]).clamp(0, 15).to(torch.uint8)
        out["zeros"] = z.to(scale_dtype).t().contiguous()
    out["qweight"] = pack_int4(u.reshape(N, K), G)
    out["scales"] = s.t().contiguous()
    return dict(sorted(out.items()))


def pack_int4(u: torch.Tensor, group_size: int) -> torch.Tensor:
    """u uint8 [N, K] with values in [0, 15] -> [N, K // 2] in the half-split layout."""
    N, K = u.shape
    ug = u.reshape(N, K // group_size, 2, group_size // 2)  # [N, groups, half, i]
    return (ug[:, :, 0] | (ug[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """qweight uint8 [N, K // 2] -> u uint8 [N, K] (inverse of pack_int4)."""
    N, KB = qweight.shape
    qg = qweight.reshape(N, KB * 2 // group_size, 1, group_size // 2)
    return torch.cat((qg & 0xF, qg >> 4), dim=2).reshape(N, KB * 2)


def quant_info(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None
) -> tuple[int, int, int, int]:
    """(bits, N, K, group_size) implied by the tensors; asserts they are consistent."""
    check(qweight.dim() == 2 and scales.dim() == 2, "qweight and scales must be 2-D")
    check(
        qweight.dtype in (torch.int8, torch.uint8),
        f"qweight: dtype {qweight.dtype} (int8 for int8, uint8 for packed int4)",
    )
    bits = 8 if qweight.dtype == torch.int8 else 4
    N = qweight.shape[0]
    K = qweight.shape[1] * (2 if bits == 4 else 1)
    check(scales.shape[1] == N, f"scales: shape {tuple(scales.shape)} != [K / G, N={N}]")
    check(scales.shape[0] > 0 and K % scales.shape[0] == 0, f"scales: {scales.shape[0]} groups")
    G = K // scales.shape[0]
    check(G >= 2 and G & (G - 1) == 0, f"group size {G} (from K={K}) is not a power of two")
    check(scales.dtype in (torch.float16, torch.bfloat16, torch.float32), "scales: dtype")
    if zeros is not None:
        check(bits == 4, "zeros given for an int8 weight (int8 is symmetric only)")
        check(zeros.dtype == scales.dtype, f"zeros: dtype {zeros.dtype} != scales {scales.dtype}")
        check(zeros.shape == scales.shape, f"zeros: shape {zeros.shape} != scales {scales.shape}")
    return bits, N, K, G


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference dequantization -> w [N, K] in `dtype` (computed in float32)."""
    bits, N, K, G = quant_info(qweight, scales, zeros)
    if bits == 8:
        q = qweight.float()
    else:
        u = unpack_int4(qweight, G).float()
        z = zeros.t().float() if zeros is not None else torch.full_like(scales.t(), 8.0).float()
        q = u.reshape(N, K // G, G) - z[..., None]
    w = q.reshape(N, K // G, G) * scales.t().float()[..., None]
    return w.reshape(N, K).to(dtype)


def error_bound(scales: torch.Tensor) -> torch.Tensor:
    """|w - dequantize(quantize(w))| <= this, per group, as [N, K // G]: half a step (plus the
    float32 rounding of the dequantization itself)."""
    return scales.t().float() * (0.5 + 1e-4)
