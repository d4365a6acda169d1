"""Random-weight models of named shapes, built directly in their tier (no checkpoint on disk).

`zeroinf-bench` uses these so a 26 GB model needs no 26 GB file: the manifest is laid out exactly
as the converter would lay it out (tensor shapes from transformers on the meta device), and unit
bytes are drawn from a seeded generator when the prefetcher loads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zeroinf.convert import Quantization
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
    state = model.state_dict()
    try:  # transformers 5 fuses some weights in memory (Mixtral's experts): the names on disk
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except ImportError:  # transformers 4: memory and disk names are the same
        pass
    return {k: tuple(v.shape) for k, v in state.items()}


def synthetic_manifest(
    config: dict[str, Any], dtype: torch.dtype, quant: Quantization | None = None
) -> Manifest:
    """The manifest zeroinf-convert would write for this config (with `quant`: the same
    tensors the converter would quantize, stored as its parts)."""
    from zeroinf.models import ModelConfig, get_family

    cfg = ModelConfig.from_hf(config)
    shapes = hf_shapes(config)
    units, quantized = [], []
    for name, table in get_family(cfg.model_type).unit_tensors(cfg):
        stored: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        for n in dict.fromkeys(table.values()):
            if quant is not None and quant.applies(name, n, shapes[n]):
                stored += [(f"{n}.{p}", dt, shp) for p, dt, shp in quant.parts(shapes[n])]
                quantized.append(n)
            else:
                stored.append((n, dtype, shapes[n]))
        offsets, size = layout(stored)
        tensors = tuple(
            TensorEntry(n, dtype_name(dt), shp, off, _numel(shp) * dt.itemsize)
            for (n, dt, shp), off in zip(stored, offsets, strict=True)
        )
        units.append(UnitEntry(name, f"{name}.bin", size, 0, tensors))
    qblock = quant.to_json(quantized) if quant is not None else None
    return Manifest(dtype_name(dtype), config, tuple(units), qblock)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class SyntheticCheckpoint(Checkpoint):
    """A checkpoint whose unit bytes are generated on demand (seeded, never zeros)."""

    def __init__(
        self,
        shape: str,
        dtype: torch.dtype = torch.float16,
        seed: int = 0,
        quant: Quantization | None = None,
    ) -> None:
        self.path = Path(f"<synthetic {shape}>")
        self.manifest = synthetic_manifest(hf_config(shape), dtype, quant)
        self.seed = seed
        self.fill_device = "cuda" if torch.cuda.is_available() else "cpu"

    def read_unit(self, unit: UnitEntry, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` with the unit's bytes: N(0, 0.02) values in every float tensor (scales:
        |N(0, 0.002)|), uniform random integers in quantized weights."""
        gen = torch.Generator(device=self.fill_device)
        gen.manual_seed(self.seed * 100_003 + self.manifest.units.index(unit))
        for t in unit.tensors:
            dtype = _dtype(t.dtype)
            n = t.nbytes // dtype.itemsize
            dev = self.fill_device
            if dtype.is_floating_point:
                vals = torch.randn(n, generator=gen, device=dev, dtype=torch.float32)
                vals = (vals.abs() * 0.002 if t.name.endswith(".scales") else vals * 0.02).to(dtype)
            else:
                vals = torch.randint(0, 256, (t.nbytes,), generator=gen, device=dev)
                vals = vals.to(torch.uint8)
            out[t.offset : t.offset + t.nbytes].copy_(vals.view(torch.uint8))
        return out

    def verify(self, unit: UnitEntry) -> None:
        return None


def _dtype(name: str) -> torch.dtype:
    from zeroinf.format import DTYPES

    return DTYPES[name]
