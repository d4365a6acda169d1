"""The host KV tier's native decode attention (native/host_attn.c) against a float64 torch
reference: every dtype, GQA, masks, a cache longer than the attended prefix, strided views, both
the AVX2 and the portable C path, an int8 cache; where host_attention takes it or leaves it;
and the writer thread of models/host_transfer.py against the bytes it was given."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from kernels.kv_quant import quantize_kv_ref
from zeroinf.models import host_attention as ha
from zeroinf.models.base import LayerKV
from zeroinf.models.host_transfer import HostWriter
from zeroinf.models.layers import sdpa, write_kv

pytest.importorskip("zeroinf._native_attn")

# Bounds of |native - float64 reference|: a few units of the output dtype's rounding.
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _case(B: int, H: int, Hkv: int, T: int, D: int, end: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    k, v = (torch.randn(B, Hkv, T, D, generator=g).to(dtype) for _ in "kv")
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    mask = torch.rand(B, 1, 1, end, generator=g) > 0.3
    mask[..., end - 1] = True  # a decode step always sees its own key
    return q, LayerKV(k, v, host=True), mask


def _reference(q: torch.Tensor, kv: LayerKV, end: int, mask: torch.Tensor, scale: float):
    B, H, _, D = q.shape
    keys, values = (x[:, :, :end].double() for x in (kv.k, kv.v))
    return sdpa(q.double(), keys, values, mask, scale).transpose(1, 2).reshape(B, 1, H * D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("ahead", [0, 2, 8])  # software prefetch distance (rows)
@pytest.mark.parametrize(
    "B,H,Hkv,T,D,end",
    [(3, 4, 4, 16, 16, 9), (2, 6, 2, 20, 64, 20), (5, 8, 8, 70, 128, 33), (2, 4, 1, 7, 24, 7),
     (1, 2, 2, 3, 13, 1)],
)  # fmt: skip
def test_native_decode_matches_reference(
    dtype: torch.dtype, portable: bool, ahead: int, B: int, H: int, Hkv: int, T: int, D: int,
    end: int,
) -> None:  # fmt: skip
    q, kv, mask = _case(B, H, Hkv, T, D, end, dtype, seed=B * 100 + D)
    out = torch.full((B, 1, H * D), float("nan"), dtype=dtype)
    assert ha.native_decode(q, kv, end, mask, D**-0.5, out, portable=portable, ahead=ahead)
    want = _reference(q, kv, end, mask, D**-0.5)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_native_decode_writes_the_step_first(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    """With `new`, this step's k, v land at index end - 1 (nothing else changes) and the
    attention sees them, as write_kv then attend_cached would."""
    B, T, D, end = 3, 12, 32, 7
    q, kv, mask = _case(B, heads, kv_heads, T, D, end, dtype, seed=7)
    before = (kv.k.clone(), kv.v.clone())
    g = torch.Generator().manual_seed(8)
    new = tuple(torch.randn(B, kv_heads, 1, D, generator=g).to(dtype) for _ in "kv")
    out = torch.empty(B, 1, heads * D, dtype=dtype)
    assert ha.native_decode(q, kv, end, mask, D**-0.5, out, new=new)
    for cache, old, x in zip((kv.k, kv.v), before, new, strict=True):
        assert torch.equal(cache[:, :, end - 1 : end], x)
        old[:, :, end - 1 : end] = x
        assert torch.equal(cache, old)
    want = _reference(q, kv, end, mask, D**-0.5)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=TOL[dtype])


def _int8_case(B: int, H: int, Hkv: int, T: int, D: int, end: int, dtype: torch.dtype, seed: int):
    """_case's with the cache quantized by the reference (kernels.kv_quant), its reference the
    float64 attention over the dequantized cache."""
    q, kv, mask = _case(B, H, Hkv, T, D, end, dtype, seed)
    (kq, ks), (vq, vs) = quantize_kv_ref(kv.k), quantize_kv_ref(kv.v)
    exact = LayerKV(kq.double() * ks.double()[..., None], vq.double() * vs.double()[..., None])
    return q, LayerKV(kq, vq, ks, vs, host=True), mask, _reference(q, exact, end, mask, D**-0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize(
    "B,H,Hkv,T,D,end",
    [(3, 4, 4, 16, 16, 9), (2, 6, 2, 40, 64, 37), (5, 8, 8, 70, 128, 33), (1, 2, 2, 3, 13, 1)],
)  # fmt: skip
def test_native_decode_int8_cache_matches_reference(
    dtype: torch.dtype, portable: bool, B: int, H: int, Hkv: int, T: int, D: int, end: int
) -> None:
    """An int8 cache with its per-token scales, read by the kernel (int8 in, dequantized in
    registers), against float64 attention over q * scale: GQA, masks, blocks of 16 keys and a
    tail, a head size the AVX2 path does not take (13)."""
    q, kv, mask, want = _int8_case(B, H, Hkv, T, D, end, dtype, seed=B * 10 + D)
    out = torch.full((B, 1, H * D), float("nan"), dtype=dtype)
    assert ha.native_decode(q, kv, end, mask, D**-0.5, out, portable=portable)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("portable", [False, True])
def test_native_decode_int8_writes_as_write_kv(dtype: torch.dtype, portable: bool) -> None:
    """This step's k, v quantized by the kernel as it writes them: the same int8 bytes and
    scales as write_kv (the reference quantizer), nothing else touched; an all-zero row gets
    scale 0; values on a rounding tie (x / s = k + 0.5) round to even."""
    B, H, Hkv, T, D, end = 3, 6, 2, 12, 32, 7
    q, kv, mask, _ = _int8_case(B, H, Hkv, T, D, end, dtype, seed=9)
    g = torch.Generator().manual_seed(10)
    k, v = (torch.randn(B, Hkv, 1, D, generator=g).to(dtype) for _ in "kv")
    k[0, 0] = 0.0  # all zero: scale 0, q 0
    v[1, 1, 0, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5])  # scale 1: ties at 0.5, 1.5, -2.5
    v[1, 1, 0, 4:] = 0.0
    ref = LayerKV(*(x.clone() for x in (kv.k, kv.v, kv.k_scale, kv.v_scale)), host=True)
    write_kv(ref, k, v, end - 1)
    out = torch.empty(B, 1, H * D, dtype=dtype)
    assert ha.native_decode(q, kv, end, mask, D**-0.5, out, new=(k, v), portable=portable)
    for got, want in ((kv.k, ref.k), (kv.v, ref.v), (kv.k_scale, ref.k_scale),
                      (kv.v_scale, ref.v_scale)):  # fmt: skip
        assert torch.equal(got, want)
    assert torch.equal(kv.v[1, 1, end - 1, :4], torch.tensor([127, 0, 2, -2], dtype=torch.int8))
    exact = LayerKV(kv.k.double() * kv.k_scale.double()[..., None],
                    kv.v.double() * kv.v_scale.double()[..., None])  # fmt: skip
    # the tie row's value of 127 makes outputs up to ~50: their rounding is relative to that
    torch.testing.assert_close(out.double(), _reference(q, exact, end, mask, D**-0.5),
                               rtol=TOL[dtype], atol=TOL[dtype])  # fmt: skip


def test_native_decode_views_and_unmasked_rows() -> None:
    """q as the transposed view the model makes, the output a slice of a wider buffer, a mask
    broadcast over rows (stride 0), and a row with nothing visible (zeros, by the contract)."""
    B, H, T, D, end = 4, 4, 12, 32, 10
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, 1, H, D, generator=g).transpose(1, 2)  # [B, H, 1, D], not contiguous
    kv = LayerKV(*(torch.randn(B, H, T, D, generator=g) for _ in "kv"), host=True)
    wide = torch.zeros(B, 1, 2 * H * D)
    out = wide[..., H * D :]
    mask = (torch.arange(end) % 3 != 0).expand(B, 1, 1, end)
    assert mask.stride(0) == 0
    assert ha.native_decode(q, kv, end, mask, 0.3, out)
    torch.testing.assert_close(out.double(), _reference(q, kv, end, mask, 0.3), rtol=0, atol=2e-6)
    assert not wide[..., : H * D].any()  # nothing written outside the slice
    none = torch.zeros(B, 1, 1, end, dtype=torch.bool)
    out.fill_(1)
    assert ha.native_decode(q, kv, end, none, 0.3, out)
    assert not out.any()


@pytest.mark.parametrize("portable", [False, True])
def test_native_decode_blocks_masked_whole_and_unwritten(portable: bool) -> None:
    """Left padding over whole 16-key blocks and partly into one, slots past the padding that
    were never written (NaN: a masked key is neither read into a score nor summed), scores that
    span a wide range (weights below float's smallest normal), a context that ends inside a
    block; fp16 and float32."""
    B, H, T, D, end = 3, 4, 96, 128, 77
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.float32, torch.float16):
        k = torch.randn(B, H, T, D, generator=g) * torch.tensor([1.0, 8.0, 30.0]).view(B, 1, 1, 1)
        v = torch.randn(B, H, T, D, generator=g)
        pad = torch.tensor([0, 37, 64])  # row 2: four whole blocks masked
        for b, n in enumerate(pad.tolist()):
            k[b, :, :n], v[b, :, :n] = float("nan"), float("nan")  # never written
        kv = LayerKV(k.to(dtype), v.to(dtype), host=True)
        q = torch.randn(B, H, 1, D, generator=g).to(dtype)
        mask = (torch.arange(end) >= pad.view(B, 1)).view(B, 1, 1, end)
        out = torch.empty(B, 1, H * D, dtype=dtype)
        assert ha.native_decode(q, kv, end, mask, D**-0.5, out, portable=portable)
        assert not out.isnan().any()
        clean = LayerKV(kv.k.nan_to_num(0.0), kv.v.nan_to_num(0.0), host=True)
        want = _reference(q, clean, end, mask, D**-0.5)
        torch.testing.assert_close(out.double(), want, rtol=0, atol=TOL[dtype])


def test_native_decode_declines_what_it_does_not_do() -> None:
    q, kv, mask = _case(2, 4, 4, 8, 16, 8, torch.float32, seed=3)
    out = torch.empty(2, 1, 64)
    q2 = torch.randn(2, 4, 2, 16)  # two query tokens: a prefill chunk
    assert not ha.native_decode(q2, kv, 8, torch.ones(2, 1, 2, 8, dtype=torch.bool), 1.0, out)
    fresh = (kv.k[:, :, :1], kv.v[:, :, :1])
    assert not ha.native_decode(q, kv, 8, mask, 1.0, out, fresh)
    int8 = LayerKV(kv.k.to(torch.int8), kv.v.to(torch.int8), torch.ones(2, 4, 8).half(),
                   torch.ones(2, 4, 8).half(), True)  # fmt: skip
    assert not ha.native_decode(q, int8, 8, mask, 1.0, out)  # scales not float32
    strided = LayerKV(int8.k, int8.v, torch.ones(2, 4, 8, 2)[..., 0], torch.ones(2, 4, 8), True)
    assert not ha.native_decode(q, strided, 8, mask, 1.0, out)  # scales' T not contiguous
    assert not ha.native_decode(q.half(), kv, 8, mask, 1.0, out.half())  # cache dtype differs
    wrong = (torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16))  # two tokens to write
    assert not ha.native_decode(q, kv, 8, mask, 1.0, out, new=wrong)


def test_attend_cached_takes_the_native_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step over a 16-bit or an int8 cache never reaches torch's SDPA; a prefill
    chunk does."""
    calls: list[int] = []
    monkeypatch.setattr(ha, "sdpa", lambda q, *a: calls.append(q.shape[2]) or sdpa(q, *a))
    q, kv, mask = _case(2, 4, 4, 8, 16, 8, torch.float16, seed=4)
    out = torch.empty(2, 1, 64, dtype=torch.float16)
    ha.attend_cached(q, kv, 8, mask, 0.25, out)
    assert calls == []
    torch.testing.assert_close(out.double(), _reference(q, kv, 8, mask, 0.25), rtol=0, atol=2e-3)
    q, kv8, mask, want = _int8_case(2, 4, 4, 8, 16, 8, torch.float16, seed=4)
    ha.attend_cached(q, kv8, 8, mask, 16**-0.5, out)
    assert calls == []
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-3)
    q2 = torch.randn(2, 4, 3, 16).half()
    ha.attend_cached(q2, kv, 8, torch.ones(2, 1, 3, 8, dtype=torch.bool), 0.25,
                     torch.empty(2, 3, 64, dtype=torch.float16))  # fmt: skip
    assert calls == [3]


def test_missing_module_is_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "zeroinf._native_attn", None)  # import raises ImportError
    with caplog.at_level(logging.WARNING, logger="zeroinf"):
        assert ha._load_native() is None
    assert "native host attention not built" in caplog.text
    monkeypatch.setattr(ha, "native", None)  # as the module loads then: torch's SDPA serves
    q, kv, mask = _case(2, 4, 4, 8, 16, 8, torch.float32, seed=5)
    out = torch.empty(2, 1, 64)
    ha.attend_cached(q, kv, 8, mask, 0.25, out)
    torch.testing.assert_close(out.double(), _reference(q, kv, 8, mask, 0.25), rtol=0, atol=2e-6)


def test_host_writer_writes_in_order_and_reports_errors() -> None:
    """Prompt keys land in the cache by flush(), later writes over earlier ones; a write that
    fails surfaces at the next flush as one error, and the writer serves again after it."""
    w = HostWriter(depth=2)
    kv = LayerKV(torch.zeros(2, 3, 8, 4), torch.zeros(2, 3, 8, 4), host=True)
    for i in range(6):  # more than `depth`: submit waits for room
        k = torch.full((2, 3, 2, 4), float(i))
        w.submit(kv, k, -k, start=i)
    w.flush()
    want = torch.tensor([0.0, 1, 2, 3, 4, 5, 5, 0])  # index i+1 written by i, then by i+1
    assert torch.equal(kv.k[0, 0, :, 0], want) and torch.equal(kv.v[1, 2, :, 3], -want)
    k = torch.ones(2, 3, 2, 4)
    w.submit(kv, k, k, start=7)  # two positions at index 7 of 8: the write fails
    with pytest.raises(RuntimeError, match="host KV cache write failed"):
        w.flush()
    w.flush()  # reported once
    w.submit(kv, k, k, start=0)
    w.flush()
    assert torch.equal(kv.k[:, :, :2], k)


def test_host_writer_keeps_its_own_copy() -> None:
    """A CPU caller's tensors may change after submit: what was submitted is written."""
    w = HostWriter()
    kv = LayerKV(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), host=True)
    k = torch.ones(1, 1, 1, 2)
    w.submit(kv, k, k, start=0)
    k.fill_(7)
    w.flush()
    assert torch.equal(kv.k[0, 0, 0], torch.ones(2))
