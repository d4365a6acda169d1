"""OPT: learned positions (offset 2), LayerNorm before (125m, 1.3b, ...) or after (350m) each
block, ReLU MLP, and 350m's project_in / project_out when word_embed_proj_dim != hidden_size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zeroinf.models.base import Context, LayerKV
from zeroinf.models.config import ModelConfig
from zeroinf.models.layers import attend, layer_norm, linear, linear_act

# OPT's learned position table starts at index 2 (a fairseq padding_idx legacy).
POSITION_OFFSET = 2
EMBED_TABLE = "embed_tokens.weight"  # the embed unit's token table (engine/gather.py)
IGNORED_TENSORS: tuple[str, ...] = ()
_DEC = "model.decoder."


def _projected(cfg: ModelConfig) -> bool:
    return cfg.word_embed_proj_dim != cfg.hidden_size


def _norm_keys(name: str, cfg: ModelConfig) -> list[str]:
    return [f"{name}.weight", f"{name}.bias"] if cfg.norm_affine else []


def unit_tensors(cfg: ModelConfig) -> list[tuple[str, dict[str, str]]]:
    embed_keys = ["embed_tokens.weight", "embed_positions.weight"]
    if _projected(cfg):
        embed_keys.append("project_in.weight")
    units = [("embed", {k: _DEC + k for k in embed_keys})]
    for i in range(cfg.num_layers):
        keys = _norm_keys("self_attn_layer_norm", cfg) + _norm_keys("final_layer_norm", cfg)
        for p in ("q", "k", "v", "out"):
            keys.append(f"self_attn.{p}_proj.weight")
            if cfg.o_bias if p == "out" else cfg.qkv_bias:
                keys.append(f"self_attn.{p}_proj.bias")
        for fc in ("fc1", "fc2"):
            keys += [f"{fc}.weight"] + ([f"{fc}.bias"] if cfg.mlp_bias else [])
        units.append((f"layers.{i}", {k: f"{_DEC}layers.{i}.{k}" for k in keys}))
    head = {k: _DEC + k for k in _norm_keys("final_layer_norm", cfg)} if cfg.final_norm else {}
    if _projected(cfg):
        head["project_out.weight"] = _DEC + "project_out.weight"
    head["lm_head.weight"] = (
        _DEC + "embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    )
    units.append(("head", head))
    return units


def _ln(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, cfg: ModelConfig) -> torch.Tensor:
    if cfg.norm_affine:
        return layer_norm(x, w[f"{name}.weight"], w[f"{name}.bias"], cfg.norm_eps)
    return layer_norm(x, None, None, cfg.norm_eps)


def embed(
    x: torch.Tensor, w: dict[str, torch.Tensor], ctx: Context, cfg: ModelConfig
) -> torch.Tensor:
    """x: the ids' rows of the EMBED_TABLE [B, S, word_embed_proj_dim] -> [B, S, D]."""
    if _projected(cfg):
        x = linear(x, w["project_in.weight"])  # [B, S, D]
    return x + F.embedding(ctx.positions + POSITION_OFFSET, w["embed_positions.weight"])


def _attention(
    x: torch.Tensor, w: dict[str, torch.Tensor], kv: LayerKV, ctx: Context, cfg: ModelConfig
) -> torch.Tensor:
    B, S, _ = x.shape
    H, Dh = cfg.num_heads, cfg.head_dim

    def proj(p: str) -> torch.Tensor:
        b = w[f"self_attn.{p}_proj.bias"] if cfg.qkv_bias else None
        return linear(x, w[f"self_attn.{p}_proj.weight"], b).view(B, S, H, Dh).transpose(1, 2)

    # OPT scales q before the product (transformers keeps that order; it matters in bf16).
    q = proj("q") * Dh**-0.5  # [B, H, S, Dh]
    o = attend(q, proj("k"), proj("v"), kv, ctx, scale=1.0)  # [B, S, D]
    bo = w["self_attn.out_proj.bias"] if cfg.o_bias else None
    return linear(o, w["self_attn.out_proj.weight"], bo)


def layer(
    h: torch.Tensor, w: dict[str, torch.Tensor], kv: LayerKV, ctx: Context, cfg: ModelConfig
) -> torch.Tensor:
    before = cfg.norm_before
    x = _ln(h, w, "self_attn_layer_norm", cfg) if before else h
    h = h + _attention(x, w, kv, ctx, cfg)
    if not before:
        h = _ln(h, w, "self_attn_layer_norm", cfg)
    x = _ln(h, w, "final_layer_norm", cfg) if before else h
    b1, b2 = (w["fc1.bias"], w["fc2.bias"]) if cfg.mlp_bias else (None, None)
    h = h + linear(linear_act(x, w["fc1.weight"], b1, cfg.act), w["fc2.weight"], b2)
    return h if before else _ln(h, w, "final_layer_norm", cfg)


def head(h: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """h [B, S, D] -> float32 logits [B, S, V]."""
    if cfg.final_norm:
        h = _ln(h, w, "final_layer_norm", cfg)
    if _projected(cfg):
        h = linear(h, w["project_out.weight"])  # [B, S, word_embed_proj_dim]
    return linear(h, w["lm_head.weight"]).float()
