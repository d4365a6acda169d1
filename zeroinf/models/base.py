"""The one narrow protocol between model files and the executor.

A family module (zeroinf/models/<family>.py) is pure math over plain tensors. It exports:

    unit_tensors(cfg) -> list[tuple[str, dict[str, str]]]
        Units in execution order: ("embed", {...}), ("layers.0", {...}), ..., ("head", {...}).
        Each dict maps the family's local key (e.g. "q_proj.weight") to the Hugging Face tensor
        name (e.g. "model.layers.0.self_attn.q_proj.weight"). The converter places exactly these
        HF tensors in each unit; the executor hands the model `{local key: tensor}`.
        Tied embeddings: the head's dict names the embedding's HF tensor too, and the converter
        writes a copy of it into the head unit so every unit streams on its own.
    EMBED_TABLE                             the embed unit's local key of the token table
    embed(x, w, ctx, cfg) -> h              x [B, S, E]: the ids' rows of w[EMBED_TABLE],
                                            gathered by the executor (on the host when the
                                            table stays there: engine/gather.py) -> h [B, S, D]
    layer(h, w, kv, ctx, cfg) -> h          h [B, S, D]; writes this step's keys/values into kv
    head(h, w, cfg) -> logits               h [B, S', D] -> logits [B, S', V] float32

The executor only calls these; it never looks inside a unit's dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Context:
    """Per forward pass state shared by every unit. Built by the executor once per step.

    positions: [B, S] int64 position ids of this step's tokens (left padding aware: the first
        real token of every row has position 0; padded slots hold any valid position).
    start: cache index where this step's S tokens are written; the keys visible to this step
        are kv[:, :, :start + S]. Rows are left padded so `start` is the same for all rows.
    mask: [B, 1, S, start + S] bool, True where a query may attend to a key (causal and
        padding applied). Families with a sliding window narrow it themselves (cache indices
        of the queries are start .. start+S-1).
    memo: per-step values a family computes once and reuses in every layer (rotary cos/sin).
    write_index: None, or [S] int64 cache indices of this step's tokens (start .. start+S-1)
        on the device. When set ("whole-cache" form, used for decode), the keys are written
        with index_copy_ at these indices, attention runs over the whole cache (mask is then
        [B, 1, S, T_max]), and no Python number in the math changes from step to step, so a
        unit's computation can be captured once in a CUDA graph and replayed every step.
    """

    positions: torch.Tensor
    start: int
    mask: torch.Tensor
    memo: dict[str, Any] = field(default_factory=dict)
    write_index: torch.Tensor | None = None


@dataclass(frozen=True)
class QuantWeight:
    """A linear weight [N, K] stored group-wise int4/int8 (kernels.quant's layout): what a
    family's weight dict holds in place of a tensor for a quantized checkpoint. Only
    `models.layers.linear` looks inside; it runs the fused dequant-matmul on CUDA and the torch
    reference elsewhere."""

    qweight: torch.Tensor  # int8 [N, K] or packed int4 uint8 [N, K / 2]
    scales: torch.Tensor  # [K / G, N]
    zeros: torch.Tensor | None = None  # [K / G, N], asymmetric int4 only


@dataclass
class LayerKV:
    """One layer's KV cache: k and v are [B, H_kv, T_max, D_head] in the model's dtype, or int8
    with k_scale and v_scale [B, H_kv, T_max] float32 (kernels.kv_quant: x ~= q * scale,
    symmetric per token and kv head, quantized as tokens are written).

    host: the cache is the host ("cpu") KV tier: its tensors live in host memory whatever the
    compute device, and models.layers.attend runs this layer's attention on the CPU
    (models/host_attention.py). A flag rather than a test of the tensors' device, so that the
    same path runs, and is tested, on a CPU-only machine.

    pinned: a host cache whose k and v are page-locked (engine.kvcache.new_kv_cache on a CUDA
    device): a prompt's keys and values go into it by the copy engine
    (models.host_transfer.CacheDMA), not through the writer thread. Set once at allocation, so
    that no step asks CUDA whether memory is pinned."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None
    host: bool = False
    pinned: bool = False

    def rows(self, a: int, b: int) -> LayerKV:
        """The cache of rows a..b-1 (views: writes land in this cache)."""
        ks = self.k_scale[a:b] if self.k_scale is not None else None
        vs = self.v_scale[a:b] if self.v_scale is not None else None
        return LayerKV(self.k[a:b], self.v[a:b], ks, vs, self.host, self.pinned)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


def build_context(
    attention_mask: torch.Tensor, start: int, seq: int, whole_cache: int | None = None
) -> Context:
    """Context for `seq` new tokens written at cache index `start`.

    attention_mask: [B, >= start + seq], 1 for real tokens and 0 for (left) padding.
    whole_cache: T_max for the whole-cache form (Context.write_index): the mask then spans all
    T_max cache indices, those not yet written masked out.
    """
    if whole_cache is not None:
        ctx = build_context(attention_mask, start, seq)
        T = ctx.mask.shape[-1]
        mask = torch.zeros(*ctx.mask.shape[:-1], whole_cache, dtype=torch.bool,
                           device=ctx.mask.device)  # fmt: skip
        mask[..., :T] = ctx.mask
        index = torch.arange(start, start + seq, device=ctx.mask.device)
        return Context(ctx.positions, start, mask, write_index=index)
    total = start + seq
    am = attention_mask[:, :total].bool()  # [B, T]
    positions = (am.long().cumsum(-1) - 1).clamp(min=0)[:, start:total]  # [B, S]
    q_idx = torch.arange(start, total, device=am.device)[:, None]  # [S, 1]
    k_idx = torch.arange(total, device=am.device)[None, :]  # [1, T]
    causal = k_idx <= q_idx  # [S, T]
    # A padded query would see no key at all (softmax over nothing = NaN, and NaN * 0 is NaN in
    # the next matmul); let every query see itself. Real queries never see padded keys.
    mask = (causal[None, None] & am[:, None, None, :]) | (k_idx == q_idx)[None, None]
    return Context(positions=positions, start=start, mask=mask)  # mask [B, 1, S, T]
