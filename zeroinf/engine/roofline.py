"""The physical limit of a generation run (../shared/DESIGN.md, "Measuring"): the sum over
forward passes of max(streamed bytes / link bandwidth, FLOPs / peak, HBM bytes / HBM bandwidth).
With the KV cache in host memory (every layer's with the "cpu" KV tier, some layers' with
"split": their share) the cache's bytes move from the HBM term to
two more: host memory, which the decode's attention reads the whole cache from while the link
reads the streamed weights from it too (host bytes / the host memory rate measured with both at
once), and D2H, which each pass's new keys and values cross. Pure arithmetic, so tests can check
it and every benchmark reports against the same formula."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zeroinf.format import DTYPES, Manifest


@dataclass(frozen=True)
class Machine:
    """Rates measured in the same run as the figures they bound (bytes/s, FLOP/s)."""

    stream_bytes_per_s: float  # H2D for the CPU tier; min(disk, H2D) for NVMe
    flops: float
    hbm_bytes_per_s: float
    host_bytes_per_s: float | None = None  # probe.Rates.host_memory_bytes_per_s (None: no term)
    d2h_bytes_per_s: float | None = None


@dataclass(frozen=True)
class ModelCost:
    weight_bytes: int  # all units: every forward pass reads each weight once from HBM
    matmul_params: float  # weights multiplied per token (MoE: the active experts only)
    head_params: int  # LM head, applied to one position per sequence
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    itemsize: int
    kv_vector_bytes: int = 0  # bytes of one cached key (or value) vector; 0: head_dim * itemsize
    # weights stored quantized (int4 / int8 .qweight) outside the head and the embedding: a
    # matmul of many rows dequantizes them first (kernels/qmatmul.py's "dequant" path)
    quantized_params: int = 0

    @classmethod
    def from_manifest(cls, m: Manifest) -> ModelCost:
        c: dict[str, Any] = m.config
        experts = c.get("num_local_experts") or 0
        active = (c.get("num_experts_per_tok") or 0) / experts if experts else 1.0
        params = 0.0
        head = quantized = 0
        for u in m.units:
            for t in u.tensors:
                if len(t.shape) != 2 or t.name.endswith((".scales", ".zeros")):
                    continue
                n = t.shape[0] * t.shape[1]
                if t.name.endswith(".qweight") and t.dtype == "uint8":
                    n *= 2  # two int4 weights per byte
                if u.name == "head":
                    head = max(head, n)
                elif u.name != "embed":
                    params += n * (active if ".experts." in t.name else 1.0)
                    # every expert whole: a 2048-token prefill chunk routes ~512 rows to each
                    # of Mixtral's 8 (top 2), past the fused kernel's 256 (a decode batch of
                    # more than 256 rows routes fewer to each: counted whole, an overcount)
                    quantized += n if t.name.endswith(".qweight") else 0
        heads = c.get("num_attention_heads")
        hidden = c.get("hidden_size")
        return cls(
            weight_bytes=sum(u.nbytes for u in m.units),
            matmul_params=params,
            head_params=head,
            layers=c.get("num_hidden_layers"),
            heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or hidden // heads,
            itemsize=DTYPES[m.dtype].itemsize,
            quantized_params=quantized,
        )

    def pass_flops(self, batch: int, seq: int, context: int) -> float:
        """One forward pass of `seq` new tokens per row over `context` visible positions."""
        tokens = batch * seq
        mean_visible = context - (seq - 1) / 2  # causal: query i sees context - seq + i + 1 keys
        attn = 4 * tokens * mean_visible * self.heads * self.head_dim * self.layers
        return 2 * self.matmul_params * tokens + attn + 2 * self.head_params * batch

    def kv_bytes(self, batch: int, positions: float) -> float:
        """Cache bytes of `positions` positions of every row, keys and values, all layers."""
        per_vector = self.kv_vector_bytes or self.head_dim * self.itemsize
        return 2 * batch * positions * self.kv_heads * self.layers * per_vector

    def pass_hbm_bytes(self, batch: int, context: int, kv_host_share: float = 0.0) -> float:
        """Weights once, and the cache's `context` positions of the layers whose cache is on
        the device (all but `kv_host_share` of them)."""
        return self.weight_bytes + (1 - kv_host_share) * self.kv_bytes(batch, context)

    def pass_host_bytes(self, batch: int, seq: int, context: int) -> float:
        """Host memory bytes of the cache in a pass with the cache in host memory: the `seq` new
        positions written, and a decode step (seq 1) reads all `context` (a prompt at the
        cache's start attends on the device, over its own keys)."""
        return self.kv_bytes(batch, seq + (context if seq == 1 else 0))


def roofline_seconds(
    cost: ModelCost, streamed_bytes: int, machine: Machine, batch: int, prompt: int, new: int,
    kv_host_share: float = 0.0,
) -> tuple[float, float]:  # fmt: skip
    """(prefill floor, decode floor) in seconds for `new` tokens after a `prompt`-token prefill;
    kv_host_share: the share of the layers whose cache is in host memory (the "cpu" KV tier:
    all; "split": some)."""

    def floor(seq: int, context: int) -> float:
        terms = [
            streamed_bytes / machine.stream_bytes_per_s,
            cost.pass_flops(batch, seq, context) / machine.flops,
            cost.pass_hbm_bytes(batch, context, kv_host_share) / machine.hbm_bytes_per_s,
        ]
        if kv_host_share and machine.host_bytes_per_s:
            host = kv_host_share * cost.pass_host_bytes(batch, seq, context) + streamed_bytes
            terms.append(host / machine.host_bytes_per_s)
        if kv_host_share and machine.d2h_bytes_per_s:
            terms.append(kv_host_share * cost.kv_bytes(batch, seq) / machine.d2h_bytes_per_s)
        return max(terms)

    prefill = floor(prompt, prompt)
    decode = sum(floor(1, prompt + i + 1) for i in range(new - 1))
    return prefill, decode
