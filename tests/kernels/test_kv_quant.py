from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, randn

import kernels.kv_quant as kvq
from kernels import dequantize_kv, quantize_kv, quantize_kv_ref, quantize_kv_triton

# |x - q * scale| <= scale / 2 up to the float32 quotient's rounding: x / scale within half an
# ulp (<= 2^-18 below 128) of a half-integer may round onto it, then to the far side.
SLACK = 1 + 2**-17
IMPLS = {"ref": quantize_kv_ref, "triton": quantize_kv_triton, "dispatch": quantize_kv}


def check_bound(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor, slack: float = SLACK) -> bool:
    err = (x.double() - dequantize_kv(q, s, torch.float64)).abs()
    return bool((err <= s.double()[..., None] / 2 * slack).all())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_error_bound_and_layout(gen, dtype, impl):
    """|x - q * scale| <= scale / 2 * SLACK elementwise (in float64), q in [-127, 127], the
    absmax element of each vector maps to +-127, and a zero vector stays zero."""
    mag = torch.logspace(-6, 3, 17, device=DEVICE)[:, None].to(dtype)  # per token
    x = randn(3, 5, 17, 64, gen=gen, dtype=dtype) * mag
    x[1, 2, 3] = 0.0
    q, s = IMPLS[impl](x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == x.shape[:-1]
    assert q.abs().max() <= 127
    assert (q.abs().amax(-1)[s > 0] == 127).all()
    assert s[1, 2, 3] == 0 and not q[1, 2, 3].any()
    assert check_bound(x, q, s)
    assert torch.equal(s, x.abs().amax(-1).float() / 127)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256, 1, 5])
def test_triton_matches_ref(gen, dtype, D):
    """Same q and scale, bit for bit (both divisions correctly rounded float32), on head dims
    that are and are not powers of two."""
    x = randn(2, 3, 7, D, gen=gen, dtype=dtype) * 3
    x[0, 1, 2] = 0.0
    q, s = quantize_kv_triton(x)
    q2, s2 = quantize_kv_ref(x)
    assert torch.equal(s, s2) and torch.equal(q, q2)


@pytest.mark.parametrize(
    "layout",
    ["transpose", "slice_T", "strided_D", "lead5", "expand", "one_dim", "empty"],
)
def test_triton_layouts(gen, layout):
    """Leading strides read in place (the [B, H, S, D] transpose view of a projection, a slice
    of a cache along T, broadcast dims), or copied first (D strided, > 3 unmergeable leading
    dims); outputs contiguous and equal to the reference's."""
    base = randn(2, 9, 4, 32, gen=gen, dtype=torch.bfloat16)  # [B, S, H, D]
    x = {
        "transpose": base.transpose(1, 2),  # [B, H, S, D], strides (S*H*D, D, H*D, 1)
        "slice_T": base[:, 2:7],
        "strided_D": base[..., ::2],
        "lead5": randn(2, 3, 4, 5, 16, gen=gen).permute(3, 1, 0, 2, 4)[:, :, :, 1:],
        "expand": base[:, :1].expand(2, 5, 4, 32),
        "one_dim": base[0, 0, 0],
        "empty": base[:, :0],
    }[layout]
    q, s = quantize_kv_triton(x)
    q2, s2 = quantize_kv_ref(x)
    assert q.is_contiguous() and s.is_contiguous()
    assert torch.equal(s, s2) and torch.equal(q, q2)


def test_lead_dims_merge():
    x = torch.empty(2, 9, 4, 32).transpose(1, 2)
    assert kvq._lead_dims(x) == [(2, 9 * 4 * 32), (4, 32), (9, 4 * 32)]
    assert kvq._lead_dims(torch.empty(2, 1, 3, 4, 8)) == [(24, 8)]
    assert kvq._lead_dims(torch.empty(2, 3, 4, 5, 16).permute(3, 1, 0, 2, 4)) is None


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_near_ties(impl):
    """Inputs whose exact x * 127 / absmax is a half-integer: x / scale (scale rounded to float32)
    lands within an ulp of the tie, and rounding may cross it. Both paths agree bit for bit, the
    bound holds with SLACK, and such data does exceed scale / 2 * (1 + 2^-20) (so SLACK is not
    loose)."""
    a = torch.arange(0x3F80, 0x4000, dtype=torch.int16).view(torch.bfloat16).float()  # [1, 2)
    k = torch.arange(127, dtype=torch.float32)
    x = a[:, None] * (2 * k + 1) / 254  # [128 rows, 127]: ties (up to x's own rounding)
    x = torch.cat([x, a[:, None]], 1).to(DEVICE)  # the absmax column
    q, s = IMPLS[impl](x)
    q2, s2 = quantize_kv_ref(x)
    assert torch.equal(s, s2) and torch.equal(q, q2)
    assert check_bound(x, q, s)
    assert not check_bound(x, q, s, 1 + 2**-20)


def test_dispatch(gen):
    """quantize_kv takes the kernel on CUDA with compiled Triton, the reference otherwise; the
    results are the same either way. Integer inputs are refused."""
    x = randn(4, 3, 64, gen=gen, dtype=torch.float16)
    q, s = quantize_kv(x)
    q2, s2 = quantize_kv_ref(x)
    assert torch.equal(q, q2) and torch.equal(s, s2)
    with pytest.raises(AssertionError, match="dtype"):
        quantize_kv(torch.ones(3, 4, dtype=torch.int32))
    with pytest.raises(AssertionError, match="dtype"):
        quantize_kv_triton(torch.ones(3, 4, dtype=torch.float64))


def test_chunked_matches_whole(gen, monkeypatch):
    """The reference quantizes inputs above CHUNK elements slice by slice: same result."""
    x = randn(7, 3, 9, 32, gen=gen, dtype=torch.bfloat16)
    q, s = quantize_kv_ref(x)
    monkeypatch.setattr(kvq, "CHUNK", 100)  # slices of one row of the first dimension
    q2, s2 = quantize_kv_ref(x)
    assert torch.equal(q, q2) and torch.equal(s, s2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_dtype(gen, dtype):
    x = randn(4, 6, 128, gen=gen)
    q, s = quantize_kv(x)
    y = dequantize_kv(q, s, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    want = q.double() * s.double()[..., None]
    torch.testing.assert_close(y.double(), want.to(dtype).double(), rtol=0, atol=0)
    with pytest.raises(AssertionError, match="scale"):
        dequantize_kv(q, s[..., :-1])
    with pytest.raises(AssertionError, match="int8"):
        dequantize_kv(q.float(), s)
