"""The KV cache: its size per token and its allocation, in the model's dtype or int8.

int8 stores each (row, kv head, token) vector of K and of V as int8 values with one float32
scale (kernels.kv_quant.quantize_kv): D + 4 bytes instead of 2 * D, i.e. 0.52 x a 16-bit cache at
head_dim 128. It is lossy, so it is only ever the user's choice (`kv_dtype="int8"`), never a
planner's.
"""

from __future__ import annotations

import torch

from zeroinf.errors import ConfigError
from zeroinf.models.base import LayerKV
from zeroinf.models.config import ModelConfig

KV_DTYPES = (None, "int8")


def check_kv_dtype(kv_dtype: str | None) -> str | None:
    if kv_dtype not in KV_DTYPES:
        raise ConfigError(f"kv_dtype={kv_dtype!r}: use None (the model's dtype) or 'int8'")
    return kv_dtype


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
) -> list[LayerKV]:
    """One LayerKV per layer, [B, H_kv, tokens, D] each, zero-filled: attention over the whole
    cache (the decode form) gives unwritten slots a zero weight, and 0 * NaN from uninitialised
    memory would be NaN."""
    shape = (batch, cfg.num_kv_heads, tokens, cfg.head_dim)
    if check_kv_dtype(kv_dtype) == "int8":

        def layer() -> LayerKV:
            k, v = (torch.zeros(shape, dtype=torch.int8, device=device) for _ in range(2))
            ks, vs = (torch.zeros(shape[:3], dtype=torch.float32, device=device) for _ in "kv")
            return LayerKV(k, v, ks, vs)

        return [layer() for _ in range(cfg.num_layers)]
    return [
        LayerKV(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(cfg.num_layers)
    ]
