"""Copy from pinned host memory into a device tensor on the GPU's cores, not its copy engine.

A small host-to-device copy queued behind a large one on the copy engine waits for it, even
from another stream (cudf issue #15620: a 51 KB copy waited 12 ms behind a 200 MB one). The host
KV tier sends each layer's attention output (1.4 MB at OPT-30B's batch 96) to the GPU while the
prefetcher streams 1.2 GB layers in; this kernel reads the pinned buffer over PCIe directly
(pinned memory is mapped into the device's address space), so the copy needs no copy engine.
Measured (docs/benchmarks.md, run 26): OPT-30B's batch-96 decode step 1.041 -> 0.909 s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import cdiv, check

BLOCK = 4096


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst + offs, tl.load(src + offs, mask=m), mask=m)


def copy_from_pinned(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """dst <- src (same shape and dtype, both contiguous), src in pinned host memory and dst on
    the GPU (both on the CPU under TRITON_INTERPRET=1); stream-ordered on the current stream."""
    check(src.shape == dst.shape and src.dtype == dst.dtype,
          f"copy_from_pinned: src {tuple(src.shape)} {src.dtype} != dst {tuple(dst.shape)} "
          f"{dst.dtype}")  # fmt: skip
    check(src.is_contiguous() and dst.is_contiguous(), "copy_from_pinned: not contiguous")
    interpreted = type(_copy_kernel).__name__ == "InterpretedFunction"
    check(interpreted or (dst.is_cuda and src.is_pinned()),
          f"copy_from_pinned: src on {src.device} (pinned: {src.is_pinned()}), dst on "
          f"{dst.device}: needs pinned host -> CUDA")  # fmt: skip
    # as bytes: one kernel for every dtype
    s, d = src.view(-1).view(torch.uint8), dst.view(-1).view(torch.uint8)
    n = s.numel()
    if n:
        _copy_kernel[(cdiv(n, BLOCK),)](s, d, n, BLOCK=BLOCK)
    return dst


def copy_from_pinned_ref(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    return dst.copy_(src, non_blocking=True)
