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

LOG2E = 1.4426950408889634


@triton.jit
def _decode_attn_kernel(
    Qp,  # [B, H, D] (strides sqb, sqh, unit D)
    Kp,  # [B, Hkv, T_max, D]
    Vp,
    MASK,  # [B, >= length] uint8 (bool) or a dummy
    O,  # [B, H, D] contiguous (SPLITS == 1) or [B, H, SPLITS, D] float32 partials
    ML,  # [B, H, SPLITS, 2] float32 running (max, sum) per split, or a dummy
    length,
    chunk,  # keys per split
    qk_scale,  # softmax scale * log2(e): scores in base 2
    sqb,
    sqh,
    skb,
    skh,
    skt,
    svb,
    svh,
    svt,
    smb,
    H_KV: tl.constexpr,
    REP: tl.constexpr,  # query heads per kv head
    D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    SPLITS: tl.constexpr,
    DOT_F32: tl.constexpr,
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
    if DOT_F32:
        q = q.to(tl.float32)

    start = split * chunk
    end = tl.minimum(start + chunk, length)
    k_base = Kp + b * skb + hk * skh
    v_base = Vp + b * svb + hk * svh
    m_i = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_R,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < end
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + t[:, None] * skt + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + t[:, None] * svt + d[None, :], mask=kv_mask, other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale  # [BLOCK_R, BLOCK_T], base-2 logits
        ok = t_ok
        if HAS_MASK:
            ok = ok & (tl.load(MASK + b * smb + t, mask=t_ok, other=0) != 0)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen only masked keys keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
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
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = sp < SPLITS
    m = tl.load(ML + (row * SPLITS + sp) * 2, mask=s_ok, other=float("-inf"))
    lsum = tl.load(ML + (row * SPLITS + sp) * 2 + 1, mask=s_ok, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # [BLOCK_S]; 0 for empty or fully masked splits
    acc = tl.load(
        WS + (row * SPLITS + sp[:, None]) * D + d[None, :],
        mask=s_ok[:, None] & (d[None, :] < D),
        other=0.0,
    )
    num = tl.sum(acc * w[:, None], axis=0)  # [BLOCK_D]
    den = tl.sum(lsum * w, axis=0)
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
    length: int,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over keys [0, length) -> o [B, H, 1, D] in q's dtype.

    q [B, H, 1, D] (unit stride on D), k_cache/v_cache [B, Hkv, T_max, D] (unit stride on D),
    key_mask [B, >= length] bool or None, scale default D ** -0.5. `splits` overrides the
    heuristic number of key chunks (tests, tuning).
    """
    check(q.dim() == 4 and q.shape[2] == 1, f"q: shape {tuple(q.shape)} != [B, H, 1, D]")
    B, H, _, D = q.shape
    check(k_cache.shape == v_cache.shape, f"k {k_cache.shape} and v {v_cache.shape} differ")
    check(k_cache.dim() == 4, f"k_cache: shape {tuple(k_cache.shape)} != [B, Hkv, T_max, D]")
    _, Hkv, T_max, Dk = k_cache.shape
    check(k_cache.shape[0] == B and Dk == D, f"k_cache {tuple(k_cache.shape)} vs q {q.shape}")
    check(Hkv > 0 and H % Hkv == 0, f"{H} query heads are not a multiple of {Hkv} kv heads")
    check(0 < length <= T_max, f"length {length} not in 1..{T_max}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_float(name, t)
        check(t.stride(-1) == 1, f"{name}: last dim must have unit stride, strides {t.stride()}")
    check(
        k_cache.dtype == q.dtype and v_cache.dtype == q.dtype,
        f"dtypes differ: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}",
    )
    if key_mask is not None:
        check(key_mask.dtype == torch.bool, f"key_mask: dtype {key_mask.dtype} != bool")
        check(
            key_mask.dim() == 2 and key_mask.shape[0] == B and key_mask.shape[1] >= length,
            f"key_mask: shape {tuple(key_mask.shape)} != [B={B}, >= {length}]",
        )
        check(key_mask.stride(-1) == 1, "key_mask: last dim must have unit stride")
    check_device(_decode_attn_kernel, q, k_cache, v_cache, key_mask)
    scale = D**-0.5 if scale is None else scale
    REP = H // Hkv
    n_splits = splits or pick_splits(B * Hkv, length, q.device)
    chunk = cdiv(cdiv(length, n_splits), 64) * 64  # whole BLOCK_T steps
    n_splits = cdiv(length, chunk)
    o = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    if n_splits == 1:
        ws, ml = o, o
    else:
        ws = torch.empty((B, H, n_splits, D), dtype=torch.float32, device=q.device)
        ml = torch.empty((B, H, n_splits, 2), dtype=torch.float32, device=q.device)
    BLOCK_D = next_pow2(D)
    _decode_attn_kernel[(B * Hkv, n_splits)](
        q,
        k_cache,
        v_cache,
        key_mask.view(torch.uint8) if key_mask is not None else q,
        ws,
        ml,
        length,
        chunk,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        key_mask.stride(0) if key_mask is not None else 0,
        H_KV=Hkv,
        REP=REP,
        D=D,
        HAS_MASK=key_mask is not None,
        SPLITS=n_splits,
        DOT_F32=q.dtype == torch.float32 or interpreting(),
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
    length: int,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Torch path (zeroinf.models.layers.attend for one query): expand kv heads, SDPA."""
    B, H, _, D = q.shape
    keys, values = k_cache[:, :, :length], v_cache[:, :, :length]  # [B, Hkv, T, D]
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
    length: int,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """float64 softmax attention, written out (no SDPA): the tests' oracle."""
    B, H, _, D = q.shape
    Hkv = k_cache.shape[1]
    k = k_cache[:, :, :length].double().repeat_interleave(H // Hkv, dim=1)  # [B, H, T, D]
    v = v_cache[:, :, :length].double().repeat_interleave(H // Hkv, dim=1)
    s = (q.double() @ k.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)  # [B,H,1,T]
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :length], -math.inf)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows with no visible key -> zeros
    return p @ v
