"""Kernel tests run the Triton kernels on the CPU through Triton's interpreter when no CUDA
device is present. Triton reads TRITON_INTERPRET when a kernel module is imported, so it is set
here, before any test module imports `kernels`. (If `kernels` was imported earlier in the
session without it, the launchers raise a clear error instead of running.)"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded generator per test: inputs are random (never zeros) and reproducible."""
    return torch.Generator().manual_seed(1234)
