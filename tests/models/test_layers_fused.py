"""models/layers.py's cheaper forms of the prefill's elementwise work: copy_wide (the keys'
transposing copy moved as 8-byte words) against torch's copy_, and linear_act (ReLU in
cuBLASLt's epilogue on a GPU) against the two separate calls."""

from __future__ import annotations

import pytest
import torch

from zeroinf.models.layers import _wide_copy_ok, activation, copy_wide, linear, linear_act


def _keys(b: int, s: int, h: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    """The projection's view of keys: [B, S, H * D] viewed as [B, H, S, D] (transposed)."""
    x = torch.randn(b, s, h * d, generator=torch.Generator().manual_seed(0)).to(dtype)
    return x.view(b, s, h, d).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_copy_wide_into_a_cache_slice_matches_copy(dtype: torch.dtype) -> None:
    src = _keys(3, 5, 4, 16, dtype)
    cache = torch.full((3, 4, 9, 16), 7.0, dtype=dtype)
    expect = cache.clone()
    expect[:, :, 2:7].copy_(src)
    assert _wide_copy_ok(cache[:, :, 2:7], src)
    out = copy_wide(cache[:, :, 2:7], src)
    assert out.data_ptr() == cache[:, :, 2:7].data_ptr()
    assert torch.equal(cache, expect)  # the slice written, the rest untouched


def test_copy_wide_packs_a_transposed_source() -> None:
    src = _keys(2, 6, 3, 8, torch.float16)
    dst = torch.empty(2, 3, 6, 8, dtype=torch.float16)
    assert torch.equal(copy_wide(dst, src), src.contiguous())


@pytest.mark.parametrize(
    "case",
    ["row bytes", "misaligned", "strides", "dtype", "shape", "8-byte items"],
)
def test_copy_wide_falls_back_to_copy_where_words_do_not_fit(case: str) -> None:
    src, dst = _keys(2, 4, 3, 8, torch.float16), torch.zeros(2, 3, 4, 8, dtype=torch.float16)
    if case == "row bytes":  # 3 fp16 values a row: 6 bytes
        src, dst = _keys(2, 4, 3, 3, torch.float16), torch.zeros(2, 3, 4, 3, dtype=torch.float16)
    elif case == "misaligned":  # starts 2 bytes into an 8-byte word
        dst = torch.zeros(2 * 3 * 4 * 8 + 1, dtype=torch.float16)[1:].view(2, 3, 4, 8)
    elif case == "strides":  # rows 10 values (20 bytes) apart
        dst = torch.zeros(2, 3, 4, 10, dtype=torch.float16)[..., :8]
    elif case == "dtype":  # a converting copy
        dst = torch.zeros(2, 3, 4, 8, dtype=torch.float32)
    elif case == "8-byte items":
        src, dst = src.double(), dst.double()
    if case == "shape":  # a broadcasting copy
        src = src[:, :, :1]
    assert not _wide_copy_ok(dst, src)
    expect = dst.clone().copy_(src)
    assert torch.equal(copy_wide(dst, src), expect)


def test_linear_act_matches_linear_then_activation_on_the_cpu() -> None:
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 5, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(6)
    for act in ("relu", "gelu", "silu"):
        y = linear_act(x, w, b, act)
        assert y.shape == (2, 5, 6)
        torch.testing.assert_close(y, activation(x @ w.T + b, act))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 96, 2048])
def test_linear_act_epilogue_gives_the_same_bytes_on_a_gpu(dtype: torch.dtype, rows: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(rows // 32 + 1, 32 if rows > 1 else 1, 512, device="cuda", generator=g)
    w, b = torch.randn(1024, 512, device="cuda", generator=g), torch.randn(1024, device="cuda")
    x, w, b = (t.to(dtype) * 0.1 for t in (x, w, b))
    expect = activation(linear(x, w, b), "relu")
    assert torch.equal(linear_act(x, w, b, "relu"), expect)
