"""Oracles and tolerances shared by the kernel tests."""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Elementwise tolerance of a kernel against the torch path, per dtype: a couple of units in the
# last place (the interpreter truncates to bfloat16 where the GPU rounds; the torch path rounds
# intermediate results that the kernels keep in float32).
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}

# ||out - oracle|| / ||oracle|| for a reduction (matmul, attention) against float64: the
# output's own rounding (2^-11 fp16, 2^-8 bf16) with headroom; float32 adds summation error.
REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), **TOL[dtype])


def rel_err(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    """||actual - oracle|| / ||oracle||, in float64."""
    return ((actual.double() - oracle.double()).norm() / oracle.double().norm()).item()


def randn(*shape: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)
