"""Decode attention: one new query per row over a KV cache, GQA-aware, split over the keys.

q [B, H, 1, D]; k_cache, v_cache [B, Hkv, T_max, D] (H a multiple of Hkv); keys 0..length-1 are
valid; key_mask [B, >= length] bool (True = may attend) carries the left padding (and a sliding
window, if any); o [B, H, 1, D] (contiguous, so o.view(B, 1, H * D) is free).

Each program owns one (row, kv head) pair and one chunk of the keys, and serves all H / Hkv
query heads of that kv head from a single read of its keys and values (SDPA would need the kv
heads expanded first). The softmax is online, in float32. When B * Hkv programs cannot fill
the GPU (small batch, long cache), the keys are split into chunks whose partial results
(unnormalised output, running max, running sum) a second kernel combines (flash-decoding).
A row that may attend to no key at all gets zeros (SDPA would give NaN).

int8 KV cache (kernels.kv_quant layout): k, v int8 [B, Hkv, T_max, D] with k_scale, v_scale
float32 [B, Hkv, T_max] (x ~= q * scale per token). The same kernel reads the int8 codes (half
the bytes of a 16-bit cache) and folds the per-token scales into the [heads, keys] tiles rather
than the [keys, D] tiles: scores = (q . k_code) * k_scale[t], and the probabilities are
multiplied by v_scale[t] before the P @ V product, so dequantization costs one multiply per
score, plus the int8 -> float conversion of the codes (INT8_CONVERT below).

Length as a device tensor (CUDA graphs): `length` may be an int32/int64 tensor of one element
holding the number of valid keys. The grid and the key chunks are then sized from T_max, each
program reads the length and clamps its chunk to it (a chunk past the end runs no step and
reports an empty partial: max -inf, sum 0), so a captured call stays valid as the length grows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import (
    cdiv,
    check,
    check_device,
    check_float,
    interpreting,
    next_pow2,
    num_sms,
)
from kernels.kv_quant import cache_prefix

LOG2E = 1.4426950408889634

# int8 -> float conversion of the KV codes inside the kernel (tuning knob, read at each call):
# "magic": exponent trick (integer add into a float's mantissa, one subtract; see _i8_to);
# "cvt": Triton's conversion (I2F, a quarter-rate instruction on the H100).
INT8_CONVERT = "magic"


@triton.jit
def _i8_to(x, DT: tl.constexpr, MAGIC: tl.constexpr):
    """int8 codes -> DT, exact (|code| <= 128 fits every float dtype's mantissa).

    MAGIC: code + (0x6400 + 128) as 16-bit bits is the float16 1024 + 128 + code, and
    code + 0x4B000080 as 32-bit bits is the float32 2^23 + 128 + code; subtracting the offset
    leaves the code. bfloat16 (8 mantissa bits cannot hold 256 + code) goes through float32.
    """
    if MAGIC:
        if DT == tl.float16:
            y = (x.to(tl.int16) + 0x6480).to(tl.int16).to(tl.float16, bitcast=True) - 1152.0
        else:
            y = (x.to(tl.int32) + 0x4B000080).to(tl.int32).to(tl.float32, bitcast=True)
            y = y - 8388736.0
        return y.to(DT)
    elif DT == tl.bfloat16:
        return x.to(tl.float32).to(DT)  # what Triton emits anyway; the interpreter needs it
    else:
        return x.to(DT)


@triton.jit
def _decode_attn_kernel(
    Qp,  # [B, H, D] (strides sqb, sqh, unit D)
    Kp,  # [B, Hkv, T_max, D]
    Vp,
    KS,  # [B, Hkv, T_max] float32 key scales (unit stride on T; KV_INT8) or a dummy
    VS,  # [B, Hkv, T_max] float32 value scales, or a dummy
    MASK,  # [B, >= length] uint8 (bool) or a dummy
    O,  # [B, H, D] contiguous (SPLITS == 1) or [B, H, SPLITS, D] float32 partials
    ML,  # [B, H, SPLITS, 2] float32 running (max, sum) per split, or a dummy
    LEN,  # [1] int32/int64 number of valid keys (LEN_PTR) or a dummy
    length,  # valid keys; with LEN_PTR, T_max (the bound the loaded length is clamped to)
    chunk,  # keys per split (without LEN_PTR)
    n_chunks,  # LEN_PTR: the chunk is computed here from the loaded length, as the host does
    qk_scale,  # softmax scale * log2(e): scores in base 2
    sqb,
    sqh,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    sksb,
    sksh,
    svsb,
    svsh,
    smb,
    H_KV: tl.constexpr,
    REP: tl.constexpr,  # query heads per kv head
    D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SPLITS: tl.constexpr,
    DOT_F32: tl.constexpr,
    KV_INT8: tl.constexpr,  # int8 caches with per-token scales
    MAGIC: tl.constexpr,  # int8 -> float by the exponent trick (_i8_to)
    LEN_PTR: tl.constexpr,  # the length is read from LEN
    BLOCK_R: tl.constexpr,  # >= REP, >= 16 (tl.dot)
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // H_KV).to(tl.int64)
    hk = (bh % H_KV).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    r_ok = r < REP
    d_ok = d < D
    heads = hk * REP + r  # [BLOCK_R] query heads of this kv head

    q = tl.load(
        Qp + b * sqb + heads[:, None] * sqh + d[None, :],
        mask=r_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [BLOCK_R, BLOCK_D]
    CT: tl.constexpr = tl.float32 if DOT_F32 else Qp.dtype.element_ty  # dot operand type
    q = q.to(CT)

    if LEN_PTR:
        n_keys = tl.minimum(tl.maximum(tl.load(LEN).to(tl.int32), 0), length)
        # The int path's chunking for this length (so both give the same bits): the active
        # splits grow with the length; those past it run no step.
        chunk = tl.cdiv(tl.cdiv(n_keys, n_chunks), BLOCK_T) * BLOCK_T
    else:
        n_keys = length
    start = split * chunk
    end = tl.minimum(start + chunk, n_keys)  # <= start: this split has no key, runs no step
    k_base = Kp + b * skb + hk * skh
    v_base = Vp + b * svb + hk * svh
    ks_base = KS + b * sksb + hk * sksh
    vs_base = VS + b * svsb + hk * svsh
    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < end
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + t[:, None] * skt + d[None, :], mask=kv_mask, other=0)
        v = tl.load(v_base + t[:, None] * svt + d[None, :], mask=kv_mask, other=0)
        if KV_INT8:
            k = _i8_to(k, CT, MAGIC)
            v = _i8_to(v, CT, MAGIC)
        else:
            k = k.to(CT)
            v = v.to(CT)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        ok = t_ok
        if HAS_MASK:
            ok = ok & (tl.load(MASK + b * smb + t, mask=t_ok, other=0) != 0)
        if KV_INT8:
            s = s * (tl.load(ks_base + t, mask=t_ok, other=0.0) * qk_scale)[None, :]
        else:
            s = s * qk_scale  # [BLOCK_R, BLOCK_T], base-2 logits
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen only masked keys keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if KV_INT8:
            # v_scale folded into P; a masked key's scale (unwritten padding?) is never read.
            vs = tl.load(vs_base + t, mask=t_ok, other=0.0)
            p = p * tl.where(ok, vs, 0.0)[None, :]
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(CT), v)
        m_i = m_new

    out_mask = r_ok[:, None] & d_ok[None, :]
    if SPLITS == 1:
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(O + (b * REP * H_KV + heads[:, None]) * D + d[None, :], o, mask=out_mask)
    else:
        row = (b * REP * H_KV + heads) * SPLITS + split  # [BLOCK_R] index into [B, H, SPLITS]
        tl.store(O + row[:, None] * D + d[None, :], acc, mask=out_mask)
        tl.store(ML + row * 2, m_i, mask=r_ok)
        tl.store(ML + row * 2 + 1, l_i, mask=r_ok)


@triton.jit
def _combine_kernel(
    WS,  # [B * H, SPLITS, D] float32 unnormalised partial outputs
    ML,  # [B * H, SPLITS, 2] float32 (max, sum), base 2
    O,  # [B * H, D]
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Sums the splits one after the other in split order: an empty split (max -inf) adds
    exact zeros, so trailing empty splits (a tensor length) leave the result's bits unchanged."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    m = tl.load(ML + (row * SPLITS + sp) * 2, mask=sp < SPLITS, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    num = tl.zeros((BLOCK_D,), dtype=tl.float32)
    den = 0.0
    for i in tl.static_range(SPLITS):
        w = tl.exp2(tl.load(ML + (row * SPLITS + i) * 2) - m_max)  # 0 for an empty split
        part = tl.load(WS + (row * SPLITS + i) * D + d, mask=d < D, other=0.0)
        num += part * w
        den += tl.load(ML + (row * SPLITS + i) * 2 + 1) * w
    o = num / tl.where(den == 0.0, 1.0, den)
    tl.store(O + row * D + d, o.to(O.dtype.element_ty), mask=d < D)


def pick_splits(programs: int, length: int, device: torch.device) -> int:
    """Key chunks per (row, kv head): ~2 waves over the SMs, chunks of >= 256 keys."""
    sms = num_sms(device)
    return max(1, min(cdiv(2 * sms, programs), cdiv(length, 256), 64))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: int | torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    splits: int | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over keys [0, length) -> o [B, H, 1, D] in q's dtype.

    q [B, H, 1, D] (unit stride on D), k_cache/v_cache [B, Hkv, T_max, D] (unit stride on D),
    key_mask [B, >= length] bool or None, scale default D ** -0.5. `splits` overrides the
    heuristic number of key chunks (tests, tuning; the heuristic sizes them from the length, or
    from T_max for a tensor length: pass the same `splits` for bit-identical int and tensor calls).
    int8 caches: k_cache, v_cache int8 with k_scale, v_scale float32 [B, Hkv, T_max] (unit
    stride on T), k ~= k_cache * k_scale[..., None] (kernels.kv_quant); float caches: q's dtype.
    length: a Python int, or an int32/int64 tensor of one element on q's device (no host value
    that changes per step: CUDA-graph capturable); then the launch is sized from T_max, values
    outside [0, T_max] are clamped, and key_mask must cover T_max keys.
    """
    check(q.dim() == 4 and q.shape[2] == 1, f"q: shape {tuple(q.shape)} != [B, H, 1, D]")
    B, H, _, D = q.shape
    check(k_cache.shape == v_cache.shape, f"k {k_cache.shape} and v {v_cache.shape} differ")
    check(k_cache.dim() == 4, f"k_cache: shape {tuple(k_cache.shape)} != [B, Hkv, T_max, D]")
    _, Hkv, T_max, Dk = k_cache.shape
    check(k_cache.shape[0] == B and Dk == D, f"k_cache {tuple(k_cache.shape)} vs q {q.shape}")
    check(Hkv > 0 and H % Hkv == 0, f"{H} query heads are not a multiple of {Hkv} kv heads")
    len_t = length if isinstance(length, torch.Tensor) else None
    if len_t is not None:
        check(
            len_t.numel() == 1 and len_t.dtype in (torch.int32, torch.int64),
            f"length: tensor of shape {tuple(len_t.shape)}, {len_t.dtype}; want one int32/int64",
        )
        bound = T_max  # keys the launch must cover
    else:
        check(0 < length <= T_max, f"length {length} not in 1..{T_max}")
        bound = int(length)
    check_float("q", q)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check(t.stride(-1) == 1, f"{name}: last dim must have unit stride, strides {t.stride()}")
    int8 = k_cache.dtype == torch.int8
    if int8:
        check(v_cache.dtype == torch.int8, f"k_cache is int8, v_cache {v_cache.dtype}")
        for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
            check(t is not None, f"int8 caches need {name}")
            assert t is not None
            check(
                t.dtype == torch.float32 and t.shape == (B, Hkv, T_max) and t.stride(-1) == 1,
                f"{name}: {t.dtype} {tuple(t.shape)} strides {t.stride()}; want float32 "
                f"[{B}, {Hkv}, {T_max}] with unit stride on T",
            )
    else:
        check(
            k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
            f"dtypes differ: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}",
        )
        check(k_scale is None and v_scale is None, "k_scale/v_scale are for int8 caches only")
    if key_mask is not None:
        check(key_mask.dtype == torch.bool, f"key_mask: dtype {key_mask.dtype} != bool")
        check(
            key_mask.dim() == 2 and key_mask.shape[0] == B and key_mask.shape[1] >= bound,
            f"key_mask: shape {tuple(key_mask.shape)} != [B={B}, >= {bound}]",
        )
        check(key_mask.stride(-1) == 1, "key_mask: last dim must have unit stride")
    check_device(_decode_attn_kernel, q, k_cache, v_cache, key_mask, k_scale, v_scale, len_t)
    check(INT8_CONVERT in ("magic", "cvt"), f"INT8_CONVERT: {INT8_CONVERT!r}")
    scale = D**-0.5 if scale is None else scale
    REP = H // Hkv
    n_req = min(splits or pick_splits(B * Hkv, bound, q.device), cdiv(bound, 64))
    chunk = cdiv(cdiv(bound, n_req), 64) * 64  # whole BLOCK_T steps
    # An int length launches the chunks it needs; a tensor length all n_req (each program
    # computes the chunk of the length it reads: the same chunks as the int call with n_req).
    n_splits = cdiv(bound, chunk) if len_t is None else n_req
    o = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    if n_splits == 1:
        ws, ml = o, o
    else:
        ws = torch.empty((B, H, n_splits, D), dtype=torch.float32, device=q.device)
        ml = torch.empty((B, H, n_splits, 2), dtype=torch.float32, device=q.device)
    BLOCK_D = next_pow2(D)
    ks = k_scale if k_scale is not None else q
    vs = v_scale if v_scale is not None else q
    _decode_attn_kernel[(B * Hkv, n_splits)](
        q,
        k_cache,
        v_cache,
        ks,
        vs,
        key_mask.view(torch.uint8) if key_mask is not None else q,
        ws,
        ml,
        len_t if len_t is not None else q,
        bound,
        chunk,
        n_req,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        ks.stride(0) if int8 else 0,
        ks.stride(1) if int8 else 0,
        vs.stride(0) if int8 else 0,
        vs.stride(1) if int8 else 0,
        key_mask.stride(0) if key_mask is not None else 0,
        H_KV=Hkv,
        REP=REP,
        D=D,
        HAS_MASK=key_mask is not None,
        SPLITS=n_splits,
        DOT_F32=q.dtype == torch.float32 or interpreting(),
        KV_INT8=int8,
        MAGIC=int8 and INT8_CONVERT == "magic",
        LEN_PTR=len_t is not None,
        BLOCK_R=max(16, next_pow2(REP)),
        BLOCK_D=BLOCK_D,
        BLOCK_T=64,
        num_warps=4,
        num_stages=3,
    )
    if n_splits > 1:
        _combine_kernel[(B * H,)](
            ws,
            ml,
            o,
            D=D,
            SPLITS=n_splits,
            BLOCK_S=next_pow2(n_splits),
            BLOCK_D=BLOCK_D,
            num_warps=4,
        )
    return o


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: int | torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch path (zeroinf.models.layers.attend for one query): dequantize the valid part of an
    int8 cache to q's dtype, expand kv heads, SDPA. A tensor length is read on the host."""
    B, H, _, D = q.shape
    length = int(length)
    keys, values = cache_prefix(k_cache, v_cache, length, k_scale, v_scale, q.dtype)
    n_rep = H // keys.shape[1]
    if n_rep > 1:
        keys = keys[:, :, None].expand(B, -1, n_rep, length, D).reshape(B, H, length, D)
        values = values[:, :, None].expand(B, -1, n_rep, length, D).reshape(B, H, length, D)
    mask = None if key_mask is None else key_mask[:, None, None, :length]  # [B, 1, 1, T]
    scale = D**-0.5 if scale is None else scale
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)


def decode_attention_oracle(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    length: int | torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """float64 softmax attention, written out (no SDPA): the tests' oracle."""
    B, H, _, D = q.shape
    Hkv = k_cache.shape[1]
    length = int(length)
    k, v = cache_prefix(k_cache, v_cache, length, k_scale, v_scale, torch.float64)
    k = k.repeat_interleave(H // Hkv, dim=1)  # [B, H, T, D]
    v = v.repeat_interleave(H // Hkv, dim=1)
    s = (q.double() @ k.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)  # [B,H,1,T]
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :length], -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key -> zeros
    return p @ v
