"""copy_from_pinned: the bytes of the pinned source, every dtype, sizes around the block; on a
GPU from pinned host memory into device memory, in the interpreter on CPU tensors."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE

from kernels import copy_from_pinned, copy_from_pinned_ref
from kernels.pinned_copy import BLOCK

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8])
@pytest.mark.parametrize("shape", [(0,), (1,), (3, BLOCK // 2 + 1), (96, 1, 7168)])
def test_copy_from_pinned_equals_the_source(gen, dtype: torch.dtype, shape) -> None:
    src = torch.randint(-100, 100, shape, generator=gen).to(dtype)
    if CUDA:
        src = src.pin_memory()
    dst = torch.full(shape, 7, dtype=dtype, device=DEVICE)
    assert copy_from_pinned(src, dst) is dst
    assert torch.equal(dst.cpu(), src.cpu())
    ref = copy_from_pinned_ref(src, torch.empty_like(dst))
    assert torch.equal(ref.cpu(), src.cpu())


def test_copy_from_pinned_names_what_is_wrong() -> None:
    src = torch.zeros(4, 8)
    with pytest.raises(AssertionError, match=r"src \(4, 8\) torch.float32 != dst \(4, 9\)"):
        copy_from_pinned(src, torch.zeros(4, 9, device=DEVICE))
    with pytest.raises(AssertionError, match="not contiguous"):
        copy_from_pinned(src.t(), torch.zeros(8, 4, device=DEVICE))
