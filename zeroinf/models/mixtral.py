"""Mixtral: the Llama/Mistral attention block with a sparse mixture-of-experts MLP.

Routing as transformers does it: softmax over all experts in float32, keep the top k, then
renormalise the kept weights to sum to 1. Each expert is a gated SiLU MLP (w1 gate, w3 up,
w2 down) applied only to the tokens routed to it.
"""

from __future__ import annotations

import torch

from zeroinf.models.base import Context, LayerKV
from zeroinf.models.config import ModelConfig
from zeroinf.models.layers import gated_mlp, linear, rms_norm
from zeroinf.models.llama import EMBED_TABLE, embed, head, head_tensors, layer_keys, self_attention

__all__ = ["EMBED_TABLE", "IGNORED_TENSORS", "embed", "head", "layer", "moe", "unit_tensors"]

IGNORED_TENSORS = (r"\.rotary_emb\.inv_freq$",)
_MOE = "block_sparse_moe"
# The routing picks each expert's tokens with data-dependent shapes (torch.where): a decode
# pass cannot be captured as a CUDA graph (engine/graphs.py), so it runs eagerly.
CUDA_GRAPHS = False


def unit_tensors(cfg: ModelConfig) -> list[tuple[str, dict[str, str]]]:
    moe_keys = [f"{_MOE}.gate.weight"]
    for e in range(cfg.num_experts):
        moe_keys += [f"{_MOE}.experts.{e}.w{j}.weight" for j in (1, 2, 3)]
    units = [("embed", {"embed_tokens.weight": "model.embed_tokens.weight"})]
    for i in range(cfg.num_layers):
        keys = layer_keys(cfg, moe_keys)
        units.append((f"layers.{i}", {k: f"model.layers.{i}.{k}" for k in keys}))
    units.append(("head", head_tensors(cfg)))
    return units


def moe(x: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """x [B, S, D] (already normed) -> [B, S, D]."""
    B, S, D = x.shape
    flat = x.reshape(B * S, D)  # [N, D]
    logits = linear(flat, w[f"{_MOE}.gate.weight"])  # [N, E]
    probs = torch.softmax(logits.float(), dim=-1)
    top_w, top_i = torch.topk(probs, cfg.experts_per_token, dim=-1)  # [N, k]
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)  # float32, as transformers keeps it
    out = torch.zeros_like(flat)
    for e in range(cfg.num_experts):
        tok, slot = torch.where(top_i == e)  # tokens routed to e, and which of their k slots
        if tok.numel() == 0:
            continue
        p = f"{_MOE}.experts.{e}."
        y = gated_mlp(
            flat[tok], w[p + "w1.weight"], w[p + "w3.weight"], w[p + "w2.weight"], cfg.act
        )
        out.index_add_(0, tok, (y * top_w[tok, slot, None]).to(out.dtype))
    return out.view(B, S, D)


def layer(
    h: torch.Tensor, w: dict[str, torch.Tensor], kv: LayerKV, ctx: Context, cfg: ModelConfig
) -> torch.Tensor:
    h = h + self_attention(rms_norm(h, w["input_layernorm.weight"], cfg.norm_eps), w, kv, ctx, cfg)
    return h + moe(rms_norm(h, w["post_attention_layernorm.weight"], cfg.norm_eps), w, cfg)
