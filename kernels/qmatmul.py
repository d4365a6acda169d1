"""Weight-only int4 / int8 group-wise dequant-matmul: y = x @ dequantize(W).T (+ bias).

x [..., K] float32/float16/bfloat16, W as kernels.quant stores it (qweight, scales, zeros?),
y [..., N] in x's dtype.

Fused kernel (decode and moderate row counts): each program streams [BLOCK_N, GROUPS * G]
weight tiles once (cp.async pipelined), expands the codes in registers to (u - z) * s in x's
dtype (int4 without conversion instructions, see _dequant) and multiplies on the tensor cores;
the full dequantized W never exists. The product is computed transposed,
acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile.T, so that the dequantized weight is the left operand
(which Hopper's wgmma takes from registers) and a decode batch of a few rows is the narrow side
of the instruction. For few rows, K is split across programs (SPLIT_K float32 partials) so that
enough programs stream W at once. The partials are reduced in one of two ways (QConfig.REDUCE):
  "last"  one launch: each program writes its partial to a workspace, then takes a ticket on
          its output tile's counter (a device-wide atomic, acq_rel); the program that arrives
          last sums the SPLIT_K partials in split order, adds the bias, casts, stores, and
          resets the counter to 0 for the next call. Saves the second launch (and the gap
          between the two kernels, ~3-5 us of a ~15-20 us decode call at 5120 x 5120).
  "sum"   two launches: the partials are summed by _splitk_sum_kernel (the earlier path).
Both sum the partials in the same fixed order (split 0, 1, ...): results are deterministic and
bit-identical between the two modes; the arrival order only decides which program adds.
The counters are one int32 buffer per device (_semaphores), zero between calls: calls on
several streams of one device must not run the "last" reduction at the same time (the engine
computes on one stream; CUDA graphs replay the same buffer, which stays valid).

Many rows (> FUSED_MAX_ROWS): the matmul is compute-bound and cuBLAS beats the fused kernel,
so W is dequantized slab by slab (<= CHUNK_ELEMS weights, never all of it) into a workspace
with the same arithmetic, and each slab is multiplied by cuBLAS.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import cdiv, check, check_device, check_float, interpreting, next_pow2, num_sms
from kernels.quant import dequantize, quant_info


@dataclass(frozen=True)
class QConfig:
    """Launch configuration. A step of the K loop covers GROUPS whole quantization groups."""

    BLOCK_M: int
    BLOCK_N: int
    GROUPS: int = 1
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 3
    GROUP_M: int = 8
    REDUCE: str = "last"  # SPLIT_K > 1: "last" (one launch) or "sum" (second kernel), see above


@triton.jit
def _dequant(
    code,  # [BN, GROUPS * C] integer codes of one step: GROUPS groups of C columns each
    zero,  # [BN, GROUPS] float32 zero points (int4), or None (int8)
    scale,  # [BN, GROUPS] float32
    DT: tl.constexpr,  # dtype of the result
    MAGIC: tl.constexpr,  # use the exponent trick below (int4 codes, 16-bit DT, on the GPU)
    GROUPS: tl.constexpr,
    C: tl.constexpr,
):
    """-> [BN, GROUPS * C] (code - zero) * scale in DT, each group with its own zero and scale.

    MAGIC: a 4-bit code becomes a 16-bit float without a conversion instruction: OR-ing it into
    the mantissa of a power of two (1024 = 0x6400 in float16, 128 = 0x4300 in bfloat16) gives
    OFFSET + code exactly, and subtracting OFFSET + zero (exact too) leaves code - zero.
    """
    BN: tl.constexpr = code.shape[0]
    if MAGIC:
        bits: tl.constexpr = 0x6400 if DT == tl.float16 else 0x4300
        offset: tl.constexpr = 1024.0 if DT == tl.float16 else 128.0
        w = tl.reshape((code.to(tl.int16) | bits).to(DT, bitcast=True), (BN, GROUPS, C))
        w = w - (zero + offset).to(DT)[:, :, None]
        w = w * scale.to(DT)[:, :, None]
    else:
        w = tl.reshape(code.to(tl.int32).to(tl.float32), (BN, GROUPS, C))
        if zero is not None:
            w = w - zero[:, :, None]
        w = w * scale[:, :, None]
    return tl.reshape(w, (BN, GROUPS * C)).to(DT)


@triton.jit
def _store_y(acc, BIAS, Y, rn, rm, offs_n, out_mask, N, HAS_BIAS: tl.constexpr):
    """acc [BN, BM] float32 (+ bias) -> y[m, n] in Y's dtype."""
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n).to(tl.float32)[:, None]
    y_ptr = Y + rm[None, :].to(tl.int64) * N + rn[:, None]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=out_mask)


# M is not specialized: Triton would compile M == 1 apart, and that variant loads x slower.
@triton.jit(do_not_specialize=["M"])
def _qmm_kernel(
    X,  # [M, K] activations (row stride stride_xm, unit column stride)
    Q,  # [N, K] int8, or [N, K / 2] uint8 (two int4 per byte, half-split layout); row stride
    S,  # [K / G, N] scales (group-major: a group's scales for consecutive outputs are adjacent)
    Z,  # [K / G, N] zeros (int4 asym; small integers in the scales' dtype) or a dummy
    BIAS,  # [N] or a dummy
    Y,  # [M, N] output (SPLIT_MODE 0, 2) or a dummy
    WS,  # [SPLIT_K, M, N] float32 partials (SPLIT_MODE 1, 2) or a dummy
    CNT,  # [>= tiles] int32 arrival counters, zero between calls (SPLIT_MODE 2) or a dummy
    M,
    N,
    K,
    stride_xm,
    stride_qn,
    SPLIT_K,  # programs along K (grid axis 1); run-time, so no recompile per split count
    BITS: tl.constexpr,
    G: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_F32: tl.constexpr,  # dot in float32 (float32 inputs, or the CPU interpreter)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr,  # quantization groups per step of the K loop
    SPLIT_MODE: tl.constexpr,  # 0: store y; 1: store partials; 2: partials, last one reduces
    GROUP_M: tl.constexpr,
    ROTATE: tl.constexpr,
):
    # Grouped ordering: GROUP_M row tiles share each weight tile while it sits in L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows

    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output channels
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows of x
    # Wrapped into range: loads need no masks; acc[n, m] depends only on weight row n and x
    # row m, so the wrapped duplicates are simply not stored.
    offs_n = rn % N
    offs_m = rm % M
    DT: tl.constexpr = X.dtype.element_ty
    MAGIC: tl.constexpr = (BITS == 4) and not DOT_F32
    CT: tl.constexpr = tl.float32 if DOT_F32 else DT  # dot operand type

    # This split's steps; a step covers GROUPS groups (K / G is a multiple of GROUPS).
    steps = K // (G * GROUPS)
    per = tl.cdiv(steps, SPLIT_K)
    s0 = split * per
    s1 = tl.minimum(s0 + per, steps)

    # Step tile: C code columns per group (int4: G/2 bytes, whose low nibbles are the group's
    # channels [0, G/2) and high nibbles [G/2, G); int8: G bytes, channels [0, G)).
    C: tl.constexpr = G // 2 if BITS == 4 else G
    col = tl.arange(0, GROUPS * C)
    chan = (col // C) * G + col % C  # input channel of each code column (int4: low nibble)
    gi = tl.arange(0, GROUPS)
    q_ptr = Q + offs_n[:, None].to(tl.int64) * stride_qn + col[None, :]  # [BN, GROUPS*C]
    x_ptr = X + offs_m[None, :].to(tl.int64) * stride_xm + chan[:, None]  # [GROUPS*C, BM]
    s_ptr = S + gi[None, :].to(tl.int64) * N + offs_n[:, None]  # [BN, GROUPS]
    z_ptr = Z + gi[None, :].to(tl.int64) * N + offs_n[:, None]
    # ROTATE (decode): the programs of one split start at different steps, so that they do not
    # all read the same few lines of x at the same moment (a hot spot in L2 when M is 1).
    n_steps = tl.maximum(s1 - s0, 1)
    rot = pid_n % n_steps if ROTATE else 0

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in range(s0, s1):
        g = (s0 + (i - s0 + rot) % n_steps) * GROUPS  # first group of this step
        code = tl.load(q_ptr + g * C)  # [BN, GROUPS * C]
        scale = tl.load(s_ptr + g * N).to(tl.float32)  # [BN, GROUPS]
        if BITS == 4:
            if HAS_Z:
                zero = tl.load(z_ptr + g * N).to(tl.float32)
            else:
                zero = tl.full((BLOCK_N, GROUPS), 8.0, tl.float32)
            w_lo = _dequant(code & 0xF, zero, scale, CT, MAGIC, GROUPS, C)
            w_hi = _dequant(code >> 4, zero, scale, CT, MAGIC, GROUPS, C)
            x_lo = tl.load(x_ptr + g * G).to(CT)  # [GROUPS * C, BM]
            x_hi = tl.load(x_ptr + g * G + G // 2).to(CT)
            if DOT_F32:
                acc = tl.dot(w_lo, x_lo, acc, input_precision="ieee")
                acc = tl.dot(w_hi, x_hi, acc, input_precision="ieee")
            else:
                acc = tl.dot(w_lo, x_lo, acc)
                acc = tl.dot(w_hi, x_hi, acc)
        else:
            w = _dequant(code, None, scale, CT, False, GROUPS, C)
            xt = tl.load(x_ptr + g * G).to(CT)  # [GROUPS * C, BM]
            if DOT_F32:
                acc = tl.dot(w, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(w, xt, acc)

    out_mask = (rn < N)[:, None] & (rm < M)[None, :]
    if SPLIT_MODE == 0:
        _store_y(acc, BIAS, Y, rn, rm, offs_n, out_mask, N, HAS_BIAS)
    else:
        ws_ptr = WS + rm[None, :].to(tl.int64) * N + rn[:, None]  # [BN, BM] -> ws[., m, n]
        tl.store(ws_ptr + split.to(tl.int64) * M * N, acc, mask=out_mask)
        if SPLIT_MODE == 2:
            # Release: every thread's partial is stored before the ticket is taken (the
            # barrier orders the CTA's stores before the one thread that does the atomic).
            tl.debug_barrier()
            ticket = tl.atomic_add(CNT + pid, 1, sem="acq_rel", scope="gpu")
            if ticket == SPLIT_K - 1:
                # Last to arrive: every other split's partial is visible (acquire). Sum in
                # split order (deterministic, as _splitk_sum_kernel), bypassing L1 (.cg).
                total = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                part = ws_ptr
                for _ in range(SPLIT_K):
                    total += tl.load(part, mask=out_mask, other=0.0, cache_modifier=".cg")
                    part += M * N
                _store_y(total, BIAS, Y, rn, rm, offs_n, out_mask, N, HAS_BIAS)
                tl.store(CNT + pid, 0)  # ready for the next call (graph replays included)


@triton.jit
def _splitk_sum_kernel(
    WS,  # [SPLIT_K, M * N] float32 partials
    BIAS,  # [N] or a dummy
    Y,  # [M * N] output
    MN,
    N,
    SPLIT_K,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(SPLIT_K):
        acc += tl.load(WS + i * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(
    Q,  # [rows, K] int8 or [rows, K / 2] uint8 codes (row stride stride_qn)
    S,  # [K / G, rows] scales (group stride stride_sg)
    Z,  # [K / G, rows] zeros or a dummy
    W,  # [rows, K] output, contiguous
    rows,
    K,
    stride_qn,
    stride_sg,
    BITS: tl.constexpr,
    G: tl.constexpr,
    HAS_Z: tl.constexpr,
    MAGIC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GROUPS: tl.constexpr,
):
    """W[rows, K] = dequantized weight rows, with the same arithmetic as the fused kernel."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g0 = tl.program_id(1) * GROUPS
    n_ok = rn < rows
    offs_n = tl.where(n_ok, rn, 0).to(tl.int64)
    DT: tl.constexpr = W.dtype.element_ty
    C: tl.constexpr = G // 2 if BITS == 4 else G
    col = tl.arange(0, GROUPS * C)
    chan = (col // C) * G + col % C
    gi = tl.arange(0, GROUPS)
    code = tl.load(Q + offs_n[:, None] * stride_qn + g0 * C + col[None, :])
    scale = tl.load(S + (g0 + gi[None, :]).to(tl.int64) * stride_sg + offs_n[:, None])
    scale = scale.to(tl.float32)
    w_ptr = W + offs_n[:, None] * K + g0 * G + chan[None, :]  # [BN, GROUPS * C]
    if BITS == 4:
        if HAS_Z:
            zero = tl.load(Z + (g0 + gi[None, :]).to(tl.int64) * stride_sg + offs_n[:, None])
            zero = zero.to(tl.float32)
        else:
            zero = tl.full((BLOCK_N, GROUPS), 8.0, tl.float32)
        tl.store(w_ptr, _dequant(code & 0xF, zero, scale, DT, MAGIC, GROUPS, C), mask=n_ok[:, None])
        w_hi = _dequant(code >> 4, zero, scale, DT, MAGIC, GROUPS, C)
        tl.store(w_ptr + G // 2, w_hi, mask=n_ok[:, None])
    else:
        tl.store(w_ptr, _dequant(code, None, scale, DT, False, GROUPS, C), mask=n_ok[:, None])


# Up to this many rows of x, the fused kernel; beyond, dequantize + cuBLAS (crossover measured
# on the H100 between 256 and 512 rows for 13B-30B layers: tools/bench_kernels.py).
FUSED_MAX_ROWS = 256
DECODE_ROWS = 64  # up to this many rows, the fused kernel's decode configuration (split-K)
# How pick_config reduces split-K partials: "last" (one launch) or "sum" (two launches, the
# earlier path). Edit here to change the default; bench_kernels.py --only decode times both.
SPLIT_REDUCE = "last"
CHUNK_ELEMS = 1 << 25  # dequantized weight slab of the prefill path: 64 MiB in 16-bit


@functools.lru_cache(maxsize=1024)
def pick_config(M: int, N: int, K: int, G: int, bits: int, device: torch.device) -> QConfig:
    """Launch configuration of the fused kernel (tuned on the H100, tools/bench_kernels.py)."""
    n_groups = K // G
    if M <= DECODE_ROWS:
        # Decode: stream W once with many programs in flight. A step covers 128 bytes of each
        # weight row; K is split until ~4 programs per SM, but into no slices shorter than
        # ~2048 (the H100 split sweep of tools/bench_kernels.py, 2026-11-24: at 5120 x 5120
        # 3 splits took 15.1 us against 17.4 us for the 7 that the programs rule alone gives).
        bm = max(16, next_pow2(M))
        bn = 64
        want = max(1, 128 // (G // 2 if bits == 4 else G))
        groups = max(d for d in (1, 2, 4, 8) if d <= want and n_groups % d == 0)
        tiles = cdiv(M, bm) * cdiv(N, bn)
        waves = 4 if bm <= 32 else 2
        by_sms = cdiv(waves * num_sms(device), tiles)
        split = max(1, min(by_sms, cdiv(K, 2048), n_groups // groups // 2, 16))
        return QConfig(bm, bn, groups, split, num_warps=4, num_stages=3, REDUCE=SPLIT_REDUCE)
    return QConfig(128, 128, 1, 1, num_warps=8, num_stages=4)


def qmatmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    config: QConfig | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequantize(qweight, scales, zeros).T + bias [N].

    Bits and group size come from the tensors (kernels.quant layout): int8 qweight [N, K] is
    int8, uint8 qweight [N, K/2] is packed int4; scales [K/G, N]; zeros [K/G, N] (asym int4).
    x [..., K] contiguous; bias in x's dtype.
    path: "fused" runs the dequant-matmul kernel (`config` overrides pick_config); "dequant"
    dequantizes slabs of <= CHUNK_ELEMS weights into a workspace and multiplies with cuBLAS
    (faster for many rows, where the matmul is compute-bound); "auto" picks "fused" for
    <= FUSED_MAX_ROWS rows (or when a config is given) and "dequant" beyond.
    """
    bits, N, K, G = quant_info(qweight, scales, zeros)
    check_float("x", x)
    check(x.shape[-1] == K, f"x: last dim {x.shape[-1]} != weight input dim {K}")
    check(x.is_contiguous(), f"x must be contiguous, got strides {x.stride()}")
    check(qweight.is_contiguous() and scales.is_contiguous(), "qweight/scales not contiguous")
    check(zeros is None or zeros.is_contiguous(), "zeros must be contiguous")
    check(path in ("auto", "fused", "dequant"), f"path: {path!r}")
    if bias is not None:
        check(bias.shape == (N,), f"bias: shape {tuple(bias.shape)} != ({N},)")
        check(bias.dtype == x.dtype, f"bias: dtype {bias.dtype} != x dtype {x.dtype}")
    # tl.dot needs >= 16 along K: an int4 group is two dots of G / 2 channels.
    min_g = 32 if bits == 4 else 16
    check(G >= min_g, f"group size {G}: the int{bits} kernel needs groups of >= {min_g}")
    check_device(_qmm_kernel, x, qweight, scales, zeros, bias)
    x2 = x.view(-1, K)
    M = x2.shape[0]
    if path == "auto":
        path = "fused" if M <= FUSED_MAX_ROWS or config is not None else "dequant"
    if path == "dequant":
        y = _dequant_matmul(x2, qweight, scales, zeros, bias, bits, G)
    else:
        y = _fused(x2, qweight, scales, zeros, bias, bits, G, config)
    return y.view(*x.shape[:-1], N)


def _fused(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    G: int,
    config: QConfig | None,
) -> torch.Tensor:
    M, K = x2.shape
    N = qweight.shape[0]
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if M == 0:
        return y
    cfg = config or pick_config(M, N, K, G, bits, x2.device)
    check((K // G) % cfg.GROUPS == 0, f"GROUPS {cfg.GROUPS} does not divide {K // G} groups")
    check(cfg.REDUCE in ("last", "sum"), f"QConfig.REDUCE: {cfg.REDUCE!r} not 'last' or 'sum'")
    split = min(cfg.SPLIT_K, K // G // cfg.GROUPS)
    mode = 0 if split == 1 else (2 if cfg.REDUCE == "last" else 1)
    ws = y if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x2.device)
    tiles = cdiv(M, cfg.BLOCK_M) * cdiv(N, cfg.BLOCK_N)
    dummy = scales
    _qmm_kernel[(tiles, split)](
        x2,
        qweight,
        scales,
        zeros if zeros is not None else dummy,
        bias if bias is not None else dummy,
        y,
        ws,
        _semaphores(x2.device, tiles) if mode == 2 else dummy,
        M,
        N,
        K,
        x2.stride(0),
        qweight.stride(0),
        split,
        BITS=bits,
        G=G,
        HAS_Z=zeros is not None,
        HAS_BIAS=bias is not None,
        DOT_F32=x2.dtype == torch.float32 or interpreting(),
        BLOCK_M=cfg.BLOCK_M,
        BLOCK_N=cfg.BLOCK_N,
        GROUPS=cfg.GROUPS,
        SPLIT_MODE=mode,
        GROUP_M=cfg.GROUP_M,
        ROTATE=M <= DECODE_ROWS,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if mode == 1:
        BLOCK = 1024
        _splitk_sum_kernel[(cdiv(M * N, BLOCK),)](
            ws,
            bias if bias is not None else dummy,
            y,
            M * N,
            N,
            split,
            HAS_BIAS=bias is not None,
            BLOCK=BLOCK,
            num_warps=4,
        )
    return y


# Arrival counters of the "last" split-K reduction, per device: int32, zero between calls (the
# last program of each tile resets its counter). Never freed or replaced while in use: a CUDA
# graph keeps the address it captured, so a larger buffer is added beside the old ones.
_SEMAPHORES: dict[torch.device, list[torch.Tensor]] = {}
SEMAPHORE_MIN = 1 << 16  # counters in the first buffer (256 KiB): decode needs <= ~2k tiles


def _semaphores(device: torch.device, n: int) -> torch.Tensor:
    bufs = _SEMAPHORES.setdefault(device, [])
    if not bufs or bufs[-1].numel() < n:
        bufs.append(torch.zeros(max(n, SEMAPHORE_MIN), dtype=torch.int32, device=device))
    return bufs[-1]


def dequantize_into(
    out: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [rows, K] (contiguous, x's dtype) = dequantized qweight rows, on the device; qweight
    [rows, ...] and scales/zeros [K / G, rows] may be row slices of a larger weight."""
    rows, K = out.shape
    G = K // scales.shape[0]
    bits = 8 if qweight.dtype == torch.int8 else 4
    check(out.is_contiguous() and qweight.stride(1) == 1 and scales.stride(1) == 1, "strides")
    check(zeros is None or zeros.stride() == scales.stride(), "zeros strides != scales")
    groups = max(d for d in (1, 2, 4) if (K // G) % d == 0 and d * G <= 256)
    BLOCK_N = 32
    _dequant_kernel[(cdiv(rows, BLOCK_N), K // G // groups)](
        qweight,
        scales,
        zeros if zeros is not None else scales,
        out,
        rows,
        K,
        qweight.stride(0),
        scales.stride(0),
        BITS=bits,
        G=G,
        HAS_Z=zeros is not None,
        MAGIC=bits == 4 and out.dtype != torch.float32 and not interpreting(),
        BLOCK_N=BLOCK_N,
        GROUPS=groups,
        num_warps=4,
    )
    return out


def _dequant_matmul(
    x2: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    G: int,
) -> torch.Tensor:
    """Many rows: the matmul is compute-bound, so dequantize slabs of W (never all of it) into a
    workspace with the fused kernel's arithmetic and let cuBLAS multiply each slab."""
    M, K = x2.shape
    N = qweight.shape[0]
    y = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    chunks = cdiv(N * K, CHUNK_ELEMS)
    rows = min(N, cdiv(cdiv(N, chunks), 128) * 128)
    slab = torch.empty((rows, K), dtype=x2.dtype, device=x2.device)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        z = zeros[:, n0:n1] if zeros is not None else None
        w = dequantize_into(slab[: n1 - n0], qweight[n0:n1], scales[:, n0:n1], z)
        if bias is None:
            torch.mm(x2, w.t(), out=y[:, n0:n1])
        else:
            torch.addmm(bias[n0:n1], x2, w.t(), out=y[:, n0:n1])
    return y


def qmatmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch path (CPU, or where the kernel does not apply): dequantize to x's dtype, F.linear.
    Materialises W; the float32 oracle of the tests is F.linear in float32/float64 instead."""
    return F.linear(x, dequantize(qweight, scales, zeros, dtype=x.dtype), bias)
