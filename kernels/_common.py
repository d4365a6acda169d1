"""Helpers shared by the kernel launchers: input checks and the interpreter switch.

Triton decides at decoration time (when a kernel module is imported) whether a kernel is
compiled for the GPU or run by its Python interpreter: TRITON_INTERPRET=1 must be set before
`kernels` is first imported for the kernels to run on CPU tensors (the kernel tests do this).
"""

from __future__ import annotations

import functools
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1).

    The interpreter of Triton 3.9 stores bfloat16 as raw uint16 and multiplies those integers in
    tl.dot, and casts integers to bfloat16 the same way; the kernels therefore upcast dot
    operands to float32 when interpreting (exact for bf16/fp16 products, as on tensor cores) and
    cast integers to float32 before any 16-bit float. It also truncates float32 -> bfloat16
    instead of rounding to nearest, so bf16 results there may differ by one unit in the last place.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check(cond: bool, msg: str) -> None:
    """Launcher precondition: AssertionError with a message naming the argument and shape."""
    if not cond:
        raise AssertionError(msg)


def check_device(kernel: object, *tensors: torch.Tensor | None) -> None:
    """All tensors on one device, and that device can run `kernel` (CUDA, or the interpreter).
    Pinned host tensors may join CUDA ones: pinned memory is mapped into the GPU's address
    space, so a kernel reads it over PCIe (kernels.pinned_copy; tools/bench_gpu_reads_host_kv)."""
    dev = tensors[0].device
    for t in tensors:
        if t is None or t.device == dev:
            continue
        if not (dev.type == "cuda" and t.device.type == "cpu" and t.is_pinned()):
            raise AssertionError(f"tensors on several devices: {dev} and {t.device}")
    if dev.type != "cuda" and type(kernel).__name__ != "InterpretedFunction":
        raise AssertionError(
            f"Triton kernel called with {dev.type} tensors: use the *_ref function, or set "
            "TRITON_INTERPRET=1 before `kernels` is first imported"
        )


def check_float(name: str, t: torch.Tensor) -> None:
    check(t.dtype in FLOAT_DTYPES, f"{name}: dtype {t.dtype} is not float32/float16/bfloat16")


# Host-side arithmetic in plain Python: triton.cdiv and friends are constexpr functions in
# recent Triton, several microseconds per call on the launch path.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; off the GPU, the H100's 132, so that the
    interpreter exercises the launch configurations the GPU would get."""
    if device.type != "cuda":
        return 132
    return _sms(device.index if device.index is not None else torch.cuda.current_device())
