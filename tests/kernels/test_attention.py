from __future__ import annotations

import sys

import pytest
import torch
import triton
import triton.language as tl
from kernel_testing import DEVICE, DTYPES, REL, randn, rel_err

from kernels import decode_attention, decode_attention_ref, quantize_kv
from kernels.attention import _i8_to, decode_attention_oracle, pick_splits


def left_padding(B: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """[B, length] bool: row b starts with a random number of padded (False) keys."""
    pad = torch.randint(0, length, (B,), generator=gen)
    pad[0] = 0
    return (torch.arange(length)[None, :] >= pad[:, None]).to(DEVICE)


# (B, H, Hkv, D, T_max, length, splits): MHA and GQA, head dims 64/80/32, lengths that are not
# multiples of the 64-key block, a single key, key chunks (splits) forced and heuristic.
CASES = [
    (2, 4, 4, 64, 100, 77, None),
    (3, 8, 2, 80, 300, 290, 3),
    (1, 6, 1, 32, 70, 1, None),
    (2, 12, 3, 64, 200, 200, 2),
    (1, 32, 8, 32, 130, 129, 5),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_float64(gen, dtype, case, masked):
    B, H, Hkv, D, T, L, splits = case
    q = randn(B, H, 1, D, gen=gen, dtype=dtype)
    k = randn(B, Hkv, T, D, gen=gen, dtype=dtype)
    v = randn(B, Hkv, T, D, gen=gen, dtype=dtype)
    k[:, :, L:] = float("nan")  # past the valid length: must never reach the result
    v[:, :, L:] = float("nan")
    mask = left_padding(B, L, gen) if masked else None
    o = decode_attention(q, k, v, L, mask, splits=splits)
    assert o.shape == (B, H, 1, D) and o.dtype == dtype
    want = decode_attention_oracle(q, k, v, L, mask)
    assert rel_err(o, want) < REL[dtype]
    assert rel_err(decode_attention_ref(q, k, v, L, mask), want) < REL[dtype]  # same oracle


def test_strided_query_and_cache_views(gen):
    """q as the models make it ([B, S, H, D] transposed) and a cache narrower than its buffer."""
    B, H, Hkv, D = 2, 4, 2, 64
    q = randn(B, 1, H, D, gen=gen).transpose(1, 2)  # [B, H, 1, D] view
    big_k, big_v = randn(B, 2 * Hkv, 90, D, gen=gen), randn(B, 2 * Hkv, 90, D, gen=gen)
    k, v = big_k[:, ::2], big_v[:, ::2]  # strided head dimension
    mask = left_padding(B, 90, gen)
    o = decode_attention(q, k, v, 81, mask)
    assert rel_err(o, decode_attention_oracle(q, k, v, 81, mask)) < REL[torch.float32]


def test_fully_masked_row_gives_zeros(gen):
    q, k, v = (
        randn(2, 2, 1, 32, gen=gen),
        randn(2, 2, 50, 32, gen=gen),
        randn(2, 2, 50, 32, gen=gen),
    )
    mask = torch.ones(2, 50, dtype=torch.bool, device=q.device)
    mask[1] = False
    for splits in (1, 3):
        o = decode_attention(q, k, v, 50, mask, splits=splits)
        assert torch.equal(o[1], torch.zeros_like(o[1]))
        assert rel_err(o[0], decode_attention_oracle(q, k, v, 50, mask)[0]) < 1e-5


def test_scale_and_invalid(gen):
    q, k, v = (
        randn(1, 4, 1, 16, gen=gen),
        randn(1, 2, 20, 16, gen=gen),
        randn(1, 2, 20, 16, gen=gen),
    )
    o = decode_attention(q, k, v, 20, scale=1.0)
    assert rel_err(o, decode_attention_oracle(q, k, v, 20, scale=1.0)) < 1e-5
    with pytest.raises(AssertionError, match="multiple"):
        decode_attention(randn(1, 3, 1, 16, gen=gen), k, v, 20)
    with pytest.raises(AssertionError, match="length"):
        decode_attention(q, k, v, 21)
    with pytest.raises(AssertionError, match="key_mask"):
        decode_attention(q, k, v, 20, torch.ones(1, 19, dtype=torch.bool))
    with pytest.raises(AssertionError, match="dtypes"):
        decode_attention(q, k.half(), v.half(), 20)


def int8_cache(B: int, Hkv: int, T: int, D: int, L: int, gen: torch.Generator):
    """int8 k, v [B, Hkv, T, D] and float32 scales [B, Hkv, T] of random float caches; past L
    the codes are random and the scales NaN (never written: must never reach the result)."""
    out = []
    for _ in range(2):
        x = randn(B, Hkv, T, D, gen=gen) * (torch.rand(B, Hkv, T, 1, generator=gen) + 0.2)
        qx, s = quantize_kv(x.to(DEVICE))
        qx[:, :, L:] = torch.randint(-127, 128, qx[:, :, L:].shape, generator=gen).to(qx)
        s[:, :, L:] = float("nan")
        out += [qx, s]
    return out  # k, k_scale, v, v_scale


# (B, H, Hkv, D, T_max, length, splits): GQA ratios 1, 4, 8; lengths not multiples of the
# 64-key block; forced and heuristic key chunks.
INT8_CASES = [
    (2, 4, 4, 64, 100, 77, None),
    (3, 8, 2, 80, 300, 290, 3),
    (1, 8, 1, 32, 70, 1, None),
    (2, 16, 2, 64, 200, 135, 2),
    (1, 32, 4, 32, 130, 129, 5),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", INT8_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("convert", ["magic", "cvt"])
def test_int8_cache_matches_float64(gen, dtype, case, masked, convert, monkeypatch):
    monkeypatch.setattr(sys.modules["kernels.attention"], "INT8_CONVERT", convert)
    B, H, Hkv, D, T, L, splits = case
    q = randn(B, H, 1, D, gen=gen, dtype=dtype)
    k, ks, v, vs = int8_cache(B, Hkv, T, D, L, gen)
    mask = left_padding(B, L, gen) if masked else None
    scales = dict(k_scale=ks, v_scale=vs)
    o = decode_attention(q, k, v, L, mask, splits=splits, **scales)
    assert o.shape == (B, H, 1, D) and o.dtype == dtype
    want = decode_attention_oracle(q, k, v, L, mask, **scales)  # on the dequantized cache
    assert rel_err(o, want) < REL[dtype]
    assert rel_err(decode_attention_ref(q, k, v, L, mask, **scales), want) < REL[dtype]
    # The length as a device tensor (int32 and int64): the same bits, launch sized from T_max.
    full_mask = None
    if masked:
        full_mask = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
        full_mask[:, :L] = mask
    n_chunks = splits or pick_splits(B * Hkv, T, torch.device(DEVICE))  # as for the tensor
    o_int = decode_attention(q, k, v, L, full_mask, splits=n_chunks, **scales)
    for ldt in (torch.int32, torch.int64):
        n = torch.tensor(L, dtype=ldt, device=DEVICE)
        assert torch.equal(decode_attention(q, k, v, n, full_mask, splits=splits, **scales), o_int)
    assert rel_err(o_int, want) < REL[dtype]


def test_int8_vs_float_cache(gen):
    """The int8 cache gives the float cache's attention within the quantization error."""
    B, H, Hkv, D, T, L = 2, 8, 2, 64, 150, 150
    q = randn(B, H, 1, D, gen=gen)
    kf, vf = randn(B, Hkv, T, D, gen=gen), randn(B, Hkv, T, D, gen=gen)
    (k, ks), (v, vs) = quantize_kv(kf), quantize_kv(vf)
    o8 = decode_attention(q, k, v, L, k_scale=ks, v_scale=vs)
    of = decode_attention(q, kf, vf, L)
    assert rel_err(o8, of) < 2e-2  # ~0.5% per-element quantization noise, averaged
    assert rel_err(of, decode_attention_oracle(q, kf, vf, L)) < REL[torch.float32]


@pytest.mark.parametrize("kv", ["float", "int8"])
@pytest.mark.parametrize("splits", [None, 1, 3, 5])
def test_length_tensor_equals_int(gen, kv, splits):
    """A device-tensor length gives exactly the int length's result, across lengths that are
    and are not multiples of the block, and a whole launch sized from T_max (chunks past the
    length contribute nothing)."""
    B, H, Hkv, D, T = 2, 8, 2, 32, 260
    q = randn(B, H, 1, D, gen=gen, dtype=torch.bfloat16)
    if kv == "int8":
        k, ks, v, vs = int8_cache(B, Hkv, T, D, T, gen)
        scales = dict(k_scale=ks, v_scale=vs)
    else:
        k, v = (randn(B, Hkv, T, D, gen=gen, dtype=torch.bfloat16) for _ in range(2))
        scales = {}
    mask = left_padding(B, T, gen)
    mask[1, :3] = False
    n = torch.zeros((), dtype=torch.int32, device=DEVICE)
    for L in (1, 64, 65, 129, 200, 260):
        n.fill_(L)  # in place, as a captured graph would see it
        o_t = decode_attention(q, k, v, n, mask, splits=splits, **scales)
        n_chunks = splits or pick_splits(B * Hkv, T, torch.device(DEVICE))
        o_i = decode_attention(q, k, v, L, mask, splits=n_chunks, **scales)
        assert torch.equal(o_t, o_i), L
        want = decode_attention_oracle(q, k, v, L, mask, **scales)
        assert rel_err(o_t, want) < REL[torch.bfloat16]


def test_length_tensor_out_of_range_and_invalid(gen):
    B, H, Hkv, D, T = 1, 4, 2, 16, 40
    q = randn(B, H, 1, D, gen=gen)
    k, v = randn(B, Hkv, T, D, gen=gen), randn(B, Hkv, T, D, gen=gen)
    zero = decode_attention(q, k, v, torch.tensor([0], device=DEVICE))
    assert torch.equal(zero, torch.zeros_like(zero))  # no key: zeros
    big = decode_attention(q, k, v, torch.tensor(T + 9, device=DEVICE))  # clamped to T_max
    assert rel_err(big, decode_attention_oracle(q, k, v, T)) < REL[torch.float32]
    with pytest.raises(AssertionError, match="length"):
        decode_attention(q, k, v, torch.tensor([3.0], device=DEVICE))
    with pytest.raises(AssertionError, match="length"):
        decode_attention(q, k, v, torch.tensor([3, 4], device=DEVICE))
    with pytest.raises(AssertionError, match="key_mask"):  # must cover T_max with a tensor
        mask = torch.ones(B, T - 1, dtype=torch.bool, device=DEVICE)
        decode_attention(q, k, v, torch.tensor(5, device=DEVICE), mask)
    (k8, ks), (v8, vs) = quantize_kv(k), quantize_kv(v)
    with pytest.raises(AssertionError, match="need k_scale"):
        decode_attention(q, k8, v8, 5)
    with pytest.raises(AssertionError, match="v_scale"):
        decode_attention(q, k8, v8, 5, k_scale=ks, v_scale=vs[..., :-1])
    with pytest.raises(AssertionError, match="int8 caches only"):
        decode_attention(q, k, v, 5, k_scale=ks, v_scale=vs)


@triton.jit
def _i8_to_probe(X, Y, DT: tl.constexpr, MAGIC: tl.constexpr):
    i = tl.arange(0, 256)
    tl.store(Y + i, _i8_to(tl.load(X + i), DT, MAGIC).to(tl.float32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("magic", [True, False])
def test_int8_conversion_exact(dtype, magic):
    """Every int8 code converts exactly, by either conversion (the float16 and bfloat16 magic
    paths too, which the attention kernel only takes on the GPU)."""
    x = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).to(DEVICE)
    y = torch.empty(256, dtype=torch.float32, device=DEVICE)
    dt = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    _i8_to_probe[(1,)](x, y, DT=dt[dtype], MAGIC=magic)
    assert torch.equal(y, x.float())
