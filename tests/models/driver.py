"""A test-side executor: runs zeroinf's model math on a transformers model's weights.

It does what the real executor does, minus placement and streaming: units built from the
tensors save_pretrained writes (the names a converter sees), one LayerKV per layer, prefill with
left padding, then greedy decode one token at a time with build_context.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from zeroinf.models import ModelConfig, get_family
from zeroinf.models.base import LayerKV, build_context


def saved_checkpoint(model: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, {HF tensor name: tensor}) exactly as save_pretrained writes them."""
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        config = json.loads((Path(d) / "config.json").read_text())
        tensors: dict[str, torch.Tensor] = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            tensors.update(load_file(f))
    return config, tensors


class Runner:
    """zeroinf's forward over a dict of HF tensors."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype):
        self.cfg = ModelConfig.from_hf(config)
        self.fam = get_family(self.cfg.model_type)
        self.dtype = dtype
        self.units = [
            (name, {k: tensors[hf].to(dtype) for k, hf in table.items()})
            for name, table in self.fam.unit_tensors(self.cfg)
        ]

    @classmethod
    def from_model(cls, model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Runner:
        config, tensors = saved_checkpoint(model)
        return cls(config, tensors, dtype)

    def new_cache(self, batch: int, t_max: int, device: torch.device | str) -> list[LayerKV]:
        c = self.cfg
        shape = (batch, c.num_kv_heads, t_max, c.head_dim)  # [B, Hkv, T_max, Dh]

        def zeros() -> torch.Tensor:
            return torch.zeros(shape, dtype=self.dtype, device=device)

        return [LayerKV(zeros(), zeros()) for _ in range(c.num_layers)]

    def to(self, device: torch.device | str) -> Runner:
        self.units = [(n, {k: t.to(device) for k, t in u.items()}) for n, u in self.units]
        return self

    def forward(
        self, ids: torch.Tensor, attention_mask: torch.Tensor, kvs: list[LayerKV], start: int
    ) -> torch.Tensor:
        """ids [B, S] at cache index `start`; attention_mask [B, >= start + S] -> [B, S, V]."""
        ctx = build_context(attention_mask, start, ids.shape[1])
        (_, w_embed), *layers, (_, w_head) = self.units
        rows = torch.nn.functional.embedding(ids, w_embed[self.fam.EMBED_TABLE])
        h = self.fam.embed(rows, w_embed, ctx, self.cfg)
        for (_, w), kv in zip(layers, kvs, strict=True):
            h = self.fam.layer(h, w, kv, ctx, self.cfg)
        return self.fam.head(h, w_head, self.cfg)

    @torch.no_grad()
    def generate(
        self, ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Greedy decode. Returns (new tokens [B, n], prefill logits [B, P, V],
        per-step logits of each generated token [B, V] * n)."""
        B, P = ids.shape
        kvs = self.new_cache(B, P + new_tokens, ids.device)
        prefill = self.forward(ids, attention_mask, kvs, 0)
        step_logits, out = [prefill[:, -1]], []
        mask = attention_mask
        for i in range(new_tokens):
            tok = step_logits[-1].argmax(-1)  # [B]
            out.append(tok)
            if i == new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            step_logits.append(self.forward(tok[:, None], mask, kvs, P + i)[:, -1])
        return torch.stack(out, dim=1), prefill, step_logits


def left_padded_batch(
    lengths: list[int], vocab: int, seed: int = 0, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left padded: (ids [B, P], attention_mask [B, P])."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), P), dtype=torch.long)
    for b, n in enumerate(lengths):
        # Ids from 3 up: clear of the tiny tokenizer's pad/bos/eos.
        ids[b, P - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[b, P - n :] = 1
    return ids, mask
