"""Random-weight models of named shapes, built directly in their tier (no checkpoint on disk).

`zeroinf-bench` uses these so a 26 GB model needs no 26 GB file: the manifest is laid out exactly
as the converter would lay it out (tensor shapes from transformers on the meta device), and unit
bytes are drawn from a seeded generator when the prefetcher loads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zeroinf.format import Checkpoint, Manifest, TensorEntry, UnitEntry, dtype_name, layout
from zeroinf.tiny import TINY_CONFIGS

# HF config.json contents of the public shapes (weights are random: only sizes matter).
SHAPES: dict[str, dict[str, Any]] = {
    "opt-13b": dict(model_type="opt", hidden_size=5120, num_hidden_layers=40,
                    num_attention_heads=40, ffn_dim=20480, vocab_size=50272,
                    max_position_embeddings=2048, word_embed_proj_dim=5120),
    "opt-30b": dict(model_type="opt", hidden_size=7168, num_hidden_layers=48,
                    num_attention_heads=56, ffn_dim=28672, vocab_size=50272,
                    max_position_embeddings=2048, word_embed_proj_dim=7168),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                       rope_theta=500000.0),
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=32000, max_position_embeddings=32768, num_local_experts=8,
                         num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6),
    **{f"tiny-{k.replace('_', '-')}": dict(model_type=k, **v) for k, v in TINY_CONFIGS.items()},
}  # fmt: skip


def hf_config(shape: str) -> dict[str, Any]:
    """The full config.json dict of a named shape, as transformers writes it."""
    import transformers

    kw = dict(SHAPES[shape])
    cls = transformers.AutoConfig.for_model(kw.pop("model_type"), **kw)
    return cls.to_dict()


def hf_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, from transformers' own model built on the meta device."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def synthetic_manifest(config: dict[str, Any], dtype: torch.dtype) -> Manifest:
    from zeroinf.models import ModelConfig, get_family

    cfg = ModelConfig.from_hf(config)
    shapes = hf_shapes(config)
    units = []
    for name, table in get_family(cfg.model_type).unit_tensors(cfg):
        names = list(table.values())
        offsets, size = layout([(n, dtype, shapes[n]) for n in names])
        tensors = tuple(
            TensorEntry(n, dtype_name(dtype), shapes[n], off, _numel(shapes[n]) * dtype.itemsize)
            for n, off in zip(names, offsets, strict=True)
        )
        units.append(UnitEntry(name, f"{name}.bin", size, 0, tensors))
    return Manifest(dtype_name(dtype), config, tuple(units))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class SyntheticCheckpoint(Checkpoint):
    """A checkpoint whose unit bytes are generated on demand (seeded, never zeros)."""

    def __init__(self, shape: str, dtype: torch.dtype = torch.float16, seed: int = 0) -> None:
        self.path = Path(f"<synthetic {shape}>")
        self.manifest = synthetic_manifest(hf_config(shape), dtype)
        self.seed = seed
        self.fill_device = "cuda" if torch.cuda.is_available() else "cpu"

    def read_unit(self, unit: UnitEntry, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` with the unit's bytes: N(0, 0.02) values in every tensor."""
        gen = torch.Generator(device=self.fill_device)
        gen.manual_seed(self.seed * 100_003 + self.manifest.units.index(unit))
        dtype = torch.empty(0, dtype=_dtype(self.manifest.dtype)).dtype
        for t in unit.tensors:
            n = t.nbytes // dtype.itemsize
            vals = torch.randn(n, generator=gen, device=self.fill_device, dtype=torch.float32)
            vals = (vals * 0.02).to(dtype)
            out[t.offset : t.offset + t.nbytes].copy_(vals.view(torch.uint8))
        return out

    def verify(self, unit: UnitEntry) -> None:
        return None


def _dtype(name: str) -> torch.dtype:
    from zeroinf.format import DTYPES

    return DTYPES[name]
