"""The KV cache: its size per token and its allocation, in the model's dtype or int8, on the
compute device (KV tier "gpu"), in host memory (KV tier "cpu"), or layer by layer on either
(KV tier "split"; plan.KV_TIERS).

int8 stores each (row, kv head, token) vector of K and of V as int8 values with one float32
scale (kernels.kv_quant.quantize_kv): D + 4 bytes instead of 2 * D, i.e. 0.52 x a 16-bit cache at
head_dim 128. It is lossy, so it is only ever the user's choice (`kv_dtype="int8"`), never a
planner's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection

import torch

from zeroinf.errors import ConfigError
from zeroinf.io import PinnedArena, aligned_empty
from zeroinf.models.base import LayerKV
from zeroinf.models.config import ModelConfig
from zeroinf.sizes import align_up, fmt_bytes

log = logging.getLogger("zeroinf")

KV_DTYPES = (None, "int8")
KV_TIER_CHOICES = (None, "gpu", "cpu", "split")  # None: the planner's choice (plan.KV_TIERS)
PIN_THREADS = 8  # threads registering a pinned host cache's tensors with CUDA (new_kv_cache)


def check_kv_dtype(kv_dtype: str | None) -> str | None:
    if kv_dtype not in KV_DTYPES:
        raise ConfigError(f"kv_dtype={kv_dtype!r}: use None (the model's dtype) or 'int8'")
    return kv_dtype


def check_kv_tier(kv_tier: str | None, planned: bool = True) -> str | None:
    """Where the user puts the KV cache: "gpu" (the compute device), "cpu" (host memory,
    attention on the CPU), "split" (some layers each way, as the planner balances them: needs
    batch_size="auto"), or None (the planner decides with batch_size="auto", else "gpu")."""
    if kv_tier not in KV_TIER_CHOICES:
        raise ConfigError(
            f"kv_tier={kv_tier!r}: use 'gpu', 'cpu' (host memory, attention on the CPU), 'split' "
            "(the planner's layers on each) or None (the planner's choice with "
            "batch_size='auto', else 'gpu')"
        )
    if kv_tier == "split" and not planned:
        raise ConfigError(
            "kv_tier='split' needs batch_size='auto': the planner picks the layers whose cache "
            "stays on the device"
        )
    return kv_tier


def kv_vector_bytes(head_dim: int, itemsize: int, kv_dtype: str | None) -> int:
    """Bytes of one cached key (or value) vector: int8 values and a float32 scale, or D
    values of the model's dtype."""
    check_kv_dtype(kv_dtype)
    return head_dim + 4 if kv_dtype == "int8" else head_dim * itemsize


def kv_token_bytes(cfg: ModelConfig, itemsize: int, kv_dtype: str | None) -> int:
    """Bytes of K and V over all layers for one token of one sequence."""
    per_vector = kv_vector_bytes(cfg.head_dim, itemsize, kv_dtype)
    return 2 * cfg.num_layers * cfg.num_kv_heads * per_vector


def new_kv_cache(
    cfg: ModelConfig,
    batch: int,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    kv_dtype: str | None = None,
    host_layers: Collection[int] = (),
) -> list[LayerKV]:
    """One LayerKV per layer, [B, H_kv, tokens, D] each, zero-filled: attention over the whole
    cache (the decode form) gives unwritten slots a zero weight, and 0 * NaN from uninitialised
    memory would be NaN.

    host_layers: the layers of the "cpu" and "split" KV tiers (plan.KV_TIERS): their cache lives
    in host memory whatever `device` is, and attention over it runs on the CPU
    (models/host_attention.py). It is mapped with transparent huge pages where the kernel allows
    (io.aligned_empty), which the host attention reads faster.

    On a CUDA device a host cache is page-locked (LayerKV.pinned): a prompt's keys and values
    then go from the device straight into the cache by DMA, one strided copy per tensor (an
    int8 cache's quantized on the device first: models.host_transfer.CacheDMA), where a
    writer thread copied them from pinned staging on the CPU (2.2-5.8 s for OPT-30B's 67.6 GB
    at batch 96 on the H100 machine, which paced the prefill on slow machines). Pinning is
    paid at a shape's first call only (DecodeState keeps the cache for same-shaped calls):
    OPT-30B's first batch-96 call, which pins 72 GB, ran 1.4 s longer than the next (the H100
    machine, docs/benchmarks.md). The layers are registered side by side
    (_pinned_host_cache); if pinning fails, a warning says so and the cache is pageable, as on
    a CPU device: zeroed here on all of torch's threads, so the pages are faulted in now, not
    by the prefill's cache writes, and the prompt's keys reach it through the writer thread."""
    kv_dtype = check_kv_dtype(kv_dtype)
    shape = (batch, cfg.num_kv_heads, tokens, cfg.head_dim)
    # a layer's tensors: k, v [shape], and for int8 their scales [shape[:3]]
    tensors = [(shape, dtype), (shape, dtype)]
    if kv_dtype == "int8":
        tensors = [(shape, torch.int8)] * 2 + [(shape[:3], torch.float32)] * 2
    pinned = None  # layer -> its pinned tensors
    if host_layers and device.type == "cuda":
        layers = [i for i in range(cfg.num_layers) if i in host_layers]
        pinned = _pinned_host_cache(tensors, layers)

    def zeros(size: tuple[int, ...], dt: torch.dtype, host: bool) -> torch.Tensor:
        if not host:
            return torch.zeros(size, dtype=dt, device=device)
        n = math.prod(size) * dt.itemsize
        return aligned_empty(n).view(dt).view(size).zero_()

    def layer(i: int) -> LayerKV:
        on_host = i in host_layers
        if on_host and pinned is not None:
            return LayerKV(*pinned[i], host=True, pinned=True)  # type: ignore[arg-type]
        return LayerKV(*(zeros(size, dt, on_host) for size, dt in tensors),  # type: ignore[arg-type]
                       host=on_host)  # fmt: skip

    return [layer(i) for i in range(cfg.num_layers)]


def _pinned_host_cache(
    tensors: list[tuple[tuple[int, ...], torch.dtype]], layers: list[int]
) -> dict[int, tuple[torch.Tensor, ...]] | None:
    """Layer -> its tensors (`tensors`: each one's shape and dtype), page-locked; None (with a
    warning) where pinning fails. cudaHostRegister runs ~20 GB/s on one thread, so a PinnedArena
    registers them side by side, PIN_THREADS at a time, a chunk per k or v (an int8 cache's two
    scales share one; the arena logs the time it took). Not zeroed: fresh anonymous pages are
    zero, and registration faults every one in."""
    sizes = [math.prod(shape) * dt.itemsize for shape, dt in tensors]
    try:
        arena = PinnedArena(sizes * len(layers), pin=True, chunk_bytes=align_up(max(sizes)),
                            threads=PIN_THREADS)  # fmt: skip
    except RuntimeError as e:  # the chunks pinned so far unpin as they are freed
        log.warning("zeroinf: pinning the host KV cache (%s) failed (%s): it stays pageable, "
                    "and the prompt's keys reach it through the writer thread",
                    fmt_bytes(sum(sizes) * len(layers)), e)  # fmt: skip
        return None
    # the slots keep their chunks' memory once the arena is gone
    return {i: tuple(arena.alloc(n).view(dt).view(shape) for n, (shape, dt) in
                     zip(sizes, tensors, strict=True)) for i in layers}  # fmt: skip
