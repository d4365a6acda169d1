from __future__ import annotations

import pytest
import torch
from kernel_testing import DTYPES, close, randn

from kernels import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref

# Row lengths: 1, primes, just past a power of two, a realistic-but-small hidden size.
SIZES = [1, 7, 100, 333, 1025, 2560]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("with_res", [False, True])
def test_rms_norm_matches_reference(gen, dtype, N, with_res):
    x = randn(3, 5, N, gen=gen, dtype=dtype)
    res = randn(3, 5, N, gen=gen, dtype=dtype) if with_res else None
    w = randn(N, gen=gen, dtype=dtype)
    y, h = rms_norm(x, w, 1e-6, residual=res)
    y_ref, h_ref = rms_norm_ref(x, w, 1e-6, residual=res)
    assert y.shape == x.shape and y.dtype == dtype and h.dtype == dtype
    close(h, h_ref, dtype)
    if not with_res:
        assert h is x
    close(y, y_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", SIZES)
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_layer_norm_matches_reference(gen, dtype, N, affine):
    x = randn(4, N, gen=gen, dtype=dtype) * 3 + 1  # non-zero mean
    res = randn(4, N, gen=gen, dtype=dtype)
    w = randn(N, gen=gen, dtype=dtype) if affine != "none" else None
    b = randn(N, gen=gen, dtype=dtype) if affine == "wb" else None
    y, h = layer_norm(x, w, b, 1e-5, residual=res)
    y_ref, h_ref = layer_norm_ref(x, w, b, 1e-5, residual=res)
    close(h, h_ref, dtype)
    close(y, y_ref, dtype)


def test_float64_oracle(gen):
    """float32 kernels against the formulas written out in float64."""
    x, r = randn(6, 777, gen=gen), randn(6, 777, gen=gen)
    w, b = randn(777, gen=gen), randn(777, gen=gen)
    h = x.double() + r.double()
    rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    mu, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    ln = (h - mu) / torch.sqrt(var + 1e-5) * w.double() + b.double()
    torch.testing.assert_close(rms_norm(x, w, 1e-6, r)[0].double(), rms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer_norm(x, w, b, 1e-5, r)[0].double(), ln, rtol=1e-5, atol=1e-5)


def test_residual_sum_is_exact_in_float16(gen):
    """The next residual is x + residual rounded once to the dtype, as the model's `h + delta`."""
    x, r = randn(2, 300, gen=gen, dtype=torch.float16), randn(2, 300, gen=gen, dtype=torch.float16)
    _, h = rms_norm(x, torch.ones(300, dtype=torch.float16, device=x.device), 1e-6, r)
    assert torch.equal(h, x + r)


def test_empty_and_invalid(gen):
    x = randn(0, 64, gen=gen)
    w = randn(64, gen=gen)
    y, _ = rms_norm(x, w, 1e-6)
    assert y.shape == (0, 64)
    x = randn(8, 64, gen=gen)
    with pytest.raises(AssertionError, match="contiguous"):
        rms_norm(x.t(), randn(8, gen=gen), 1e-6)
    with pytest.raises(AssertionError, match="dtype"):
        rms_norm(x, w.half(), 1e-6)
    with pytest.raises(AssertionError, match="shape"):
        layer_norm(x, randn(63, gen=gen), None, 1e-5)
    with pytest.raises(AssertionError, match="residual"):
        rms_norm(x, w, 1e-6, residual=randn(8, 65, gen=gen))
