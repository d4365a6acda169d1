from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import dequantize, error_bound, pack_int4, quant_info, quantize, unpack_int4

SCHEMES = [(8, "sym"), (4, "sym"), (4, "asym")]
SCALE_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def check_roundtrip(w: torch.Tensor, bits: int, G: int, scheme: str, sdt: torch.dtype) -> None:
    q = quantize(w, bits, G, scheme, sdt)
    N, K = w.shape
    assert set(q) == ({"qweight", "scales", "zeros"} if scheme == "asym" else {"qweight", "scales"})
    assert q["qweight"].shape == (N, K if bits == 8 else K // 2)
    assert q["qweight"].dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q["scales"].shape == (K // G, N) and q["scales"].dtype == sdt  # group-major
    if scheme == "asym":
        assert q["zeros"].shape == (K // G, N) and q["zeros"].dtype == sdt
    assert quant_info(**q) == (bits, N, K, G)
    err = (w.float() - dequantize(**q)).abs().reshape(N, K // G, G)
    bound = error_bound(q["scales"])[..., None]  # half a quantisation step of each group
    assert (err <= bound).all(), (err / bound).max()
    # The step is the smallest that covers the group's range: not a loose bound.
    wg = w.float().reshape(N, K // G, G)
    span = (
        wg.abs().amax(-1) / (127 if bits == 8 else 7)
        if scheme == "sym"
        else (wg.amax(-1).clamp(min=0) - wg.amin(-1).clamp(max=0)) / 15
    )
    assert (q["scales"].t().float() <= span * (1 + 2**-7) + torch.finfo(sdt).tiny).all()


@pytest.mark.parametrize("bits,scheme", SCHEMES)
@pytest.mark.parametrize("sdt", SCALE_DTYPES)
@pytest.mark.parametrize("G", [32, 64, 128])
def test_roundtrip_error_within_half_step(bits, scheme, sdt, G):
    g = torch.Generator().manual_seed(G + bits)
    w = torch.randn(37, 384, generator=g) * torch.rand(37, 1, generator=g) * 4
    w[0, :G] = 0.0  # an all-zero group
    w[1, :G] = 1.5  # a constant group
    w[2] += 3.0  # all-positive groups: asym zero point at 0
    check_roundtrip(w, bits, G, scheme, sdt)
    assert (dequantize(**quantize(w, bits, G, scheme, sdt))[0, :G] == 0).all()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    groups=st.integers(1, 5),
    G=st.sampled_from([2, 8, 64]),
    mode=st.sampled_from(SCHEMES),
    sdt=st.sampled_from(SCALE_DTYPES),
    magnitude=st.sampled_from([1e-3, 1.0, 300.0]),
    seed=st.integers(0, 2**16),
)
def test_roundtrip_property(n, groups, G, mode, sdt, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, groups * G, generator=g) * magnitude
    check_roundtrip(w, mode[0], G, mode[1], sdt)


@pytest.mark.parametrize("bits,scheme", SCHEMES)
def test_values_on_the_grid_roundtrip_exactly(bits, scheme):
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([0.5, 0.25])
    lo, hi = (-127, 127) if bits == 8 else (-7, 7) if scheme == "sym" else (-5, 10)
    q = torch.randint(lo, hi + 1, (3, 2, 64), generator=g).float()
    q[:, :, 0], q[:, :, 1] = lo, hi  # pin the range so the scale is exactly s
    w = (q * s[None, :, None]).reshape(3, 128)
    assert torch.equal(dequantize(**quantize(w, bits, 64, scheme, torch.float32)), w)


def test_int4_packed_layout():
    """The documented half-split layout, byte by byte, for G = 8."""
    u = torch.arange(16, dtype=torch.uint8).reshape(1, 16)  # two groups of 8
    p = pack_int4(u, 8)
    # byte i of group g: low = u[g*8 + i], high = u[g*8 + 4 + i]
    want = [0 | 4 << 4, 1 | 5 << 4, 2 | 6 << 4, 3 | 7 << 4, 8 | 12 << 4, 9 | 13 << 4, 10 | 14 << 4]
    assert p.tolist()[0][:7] == want
    assert p.shape == (1, 8)
    assert torch.equal(unpack_int4(p, 8), u)
    # Symmetric int4 stores q + 8; zeros give w = (u - z) * s.
    w = torch.tensor([[-7.0, 7.0] + [0.0] * 6])
    q = quantize(w, 4, 8, "sym", torch.float32)
    assert q["scales"].item() == 1.0
    assert unpack_int4(q["qweight"], 8).tolist() == [[1, 15, 8, 8, 8, 8, 8, 8]]


def test_invalid():
    w = torch.randn(4, 96)
    with pytest.raises(AssertionError, match="multiple of group_size"):
        quantize(w, 4, 64)
    with pytest.raises(AssertionError, match="power of two"):
        quantize(w, 4, 48)
    with pytest.raises(AssertionError, match="int8"):
        quantize(w, 8, 32, "asym")
    with pytest.raises(AssertionError, match="bits"):
        quantize(w, 3, 32)
    w[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        quantize(w, 8, 32)
