"""The KV cache: its size per token and its allocation, in the model's dtype or int8, on the
compute device (KV tier "gpu"), in host memory (KV tier "cpu"), or layer by layer on either
(KV tier "split"; plan.KV_TIERS).

int8 stores each (row, kv head, token) vector of K and of V as int8 values with one float32
scale (kernels.kv_quant.quantize_kv): D + 4 bytes instead of 2 * D, i.e. 0.52 x a 16-bit cache at
head_dim 128. It is lossy, so it is only ever the user's choice (`kv_dtype="int8"`), never a
planner's.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from zeroinf.errors import ConfigError
from zeroinf.io import aligned_empty
from zeroinf.models.base import LayerKV
from zeroinf.models.config import ModelConfig

KV_DTYPES = (None, "int8")
KV_TIER_CHOICES = (None, "gpu", "cpu", "split")  # None: the planner's choice (plan.KV_TIERS)


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
    (models/host_attention.py). It is ordinary
    (pageable) memory: only the step's q, k, v and output cross PCIe, through small pinned
    staging buffers, so pinning the cache would cost ~0.6 s per GiB at allocation for no
    transfer it speeds up. It is mapped with transparent huge pages where the kernel allows
    (io.aligned_empty), which the host attention reads faster, and zeroed here, on all of
    torch's threads: the pages are faulted in now, not by the prefill's cache writes."""
    shape = (batch, cfg.num_kv_heads, tokens, cfg.head_dim)

    def zeros(size: tuple[int, ...], dt: torch.dtype, host: bool) -> torch.Tensor:
        if not host:
            return torch.zeros(size, dtype=dt, device=device)
        n = math.prod(size) * dt.itemsize
        return aligned_empty(n).view(dt).view(size).zero_()

    def layer(host: bool) -> LayerKV:
        if check_kv_dtype(kv_dtype) == "int8":
            return LayerKV(zeros(shape, torch.int8, host), zeros(shape, torch.int8, host),
                           zeros(shape[:3], torch.float32, host),
                           zeros(shape[:3], torch.float32, host), host)  # fmt: skip
        return LayerKV(zeros(shape, dtype, host), zeros(shape, dtype, host), host=host)

    return [layer(i in host_layers) for i in range(cfg.num_layers)]
