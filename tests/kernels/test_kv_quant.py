from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, randn

from kernels import dequantize_kv, quantize_kv


@pytest.mark.parametrize("dtype", DTYPES)
def test_error_bound_and_layout(gen, dtype):
    """|x - q * scale| <= scale / 2 elementwise (exact, in float64), q in [-127, 127], the
    absmax element of each vector maps to +-127, and a zero vector stays zero."""
    mag = torch.logspace(-6, 3, 17, device=DEVICE)[:, None].to(dtype)  # per token
    x = randn(3, 5, 17, 64, gen=gen, dtype=dtype) * mag
    x[1, 2, 3] = 0.0
    q, s = quantize_kv(x)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == x.shape[:-1]
    assert q.abs().max() <= 127
    assert (q.abs().amax(-1)[s > 0] == 127).all()
    assert s[1, 2, 3] == 0 and not q[1, 2, 3].any()
    err = (x.double() - dequantize_kv(q, s, torch.float64)).abs()
    assert (err <= s.double()[..., None] / 2).all()
    assert torch.equal(s, x.abs().amax(-1).float() / 127)


def test_chunked_matches_whole(gen, monkeypatch):
    """Inputs above CHUNK elements are quantized slice by slice: same result."""
    import kernels.kv_quant as kvq

    x = randn(7, 3, 9, 32, gen=gen, dtype=torch.bfloat16)
    q, s = quantize_kv(x)
    monkeypatch.setattr(kvq, "CHUNK", 100)  # slices of one row of the first dimension
    q2, s2 = quantize_kv(x)
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
