"""Llama family: Llama 2/3, Mistral, Qwen2 (one layout; config flags select the differences).

Pre-norm decoder: h += attn(rms_norm(h)); h += mlp(rms_norm(h)). Rotary positions, GQA,
optional biases (Qwen2: q/k/v; Llama attention_bias: q/k/v/o; Llama mlp_bias), optional
sliding window (Mistral), tied embeddings.
"""

from __future__ import annotations

import torch

from zeroinf.models.base import Context, LayerKV
from zeroinf.models.config import ModelConfig
from zeroinf.models.layers import apply_rotary, attend, gated_mlp, linear, rms_norm, rotary

# Old Llama checkpoints saved the rotary buffer; transformers ignores it on load.
IGNORED_TENSORS = (r"\.rotary_emb\.inv_freq$",)
EMBED_TABLE = "embed_tokens.weight"  # the embed unit's token table (engine/gather.py)


def unit_tensors(cfg: ModelConfig) -> list[tuple[str, dict[str, str]]]:
    units = [("embed", {"embed_tokens.weight": "model.embed_tokens.weight"})]
    for i in range(cfg.num_layers):
        units.append(
            (f"layers.{i}", _prefixed(f"model.layers.{i}.", layer_keys(cfg, _mlp_keys(cfg))))
        )
    units.append(("head", head_tensors(cfg)))
    return units


def layer_keys(cfg: ModelConfig, mlp_keys: list[str]) -> list[str]:
    """Local keys of one decoder layer = HF names below `model.layers.{i}.` (Mixtral shares)."""
    keys = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    for p in ("q", "k", "v", "o"):
        keys.append(f"self_attn.{p}_proj.weight")
        if cfg.o_bias if p == "o" else cfg.qkv_bias:
            keys.append(f"self_attn.{p}_proj.bias")
    return keys + mlp_keys


def head_tensors(cfg: ModelConfig) -> dict[str, str]:
    lm = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
    return {"norm.weight": "model.norm.weight", "lm_head.weight": lm}


def _mlp_keys(cfg: ModelConfig) -> list[str]:
    keys = [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    if cfg.mlp_bias:
        keys += [f"mlp.{p}_proj.bias" for p in ("gate", "up", "down")]
    return keys


def _prefixed(prefix: str, keys: list[str]) -> dict[str, str]:
    return {k: prefix + k for k in keys}


def embed(
    x: torch.Tensor, w: dict[str, torch.Tensor], ctx: Context, cfg: ModelConfig
) -> torch.Tensor:
    """x: the ids' rows of the EMBED_TABLE [B, S, D], the hidden state as it is."""
    return x


def self_attention(
    x: torch.Tensor, w: dict[str, torch.Tensor], kv: LayerKV, ctx: Context, cfg: ModelConfig
) -> torch.Tensor:
    """x [B, S, D] (already normed) -> o_proj output [B, S, D]."""
    B, S, _ = x.shape
    Dh = cfg.head_dim

    def proj(p: str, heads: int) -> torch.Tensor:
        b = w[f"self_attn.{p}_proj.bias"] if cfg.qkv_bias else None
        return linear(x, w[f"self_attn.{p}_proj.weight"], b).view(B, S, heads, Dh).transpose(1, 2)

    q = proj("q", cfg.num_heads)  # [B, H, S, Dh]
    k = proj("k", cfg.num_kv_heads)  # [B, Hkv, S, Dh]
    v = proj("v", cfg.num_kv_heads)
    cos, sin = rotary(ctx, cfg, x.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    o = attend(q, k, v, kv, ctx, scale=Dh**-0.5, window=cfg.sliding_window)  # [B, S, H*Dh]
    bo = w["self_attn.o_proj.bias"] if cfg.o_bias else None
    return linear(o, w["self_attn.o_proj.weight"], bo)


def layer(
    h: torch.Tensor, w: dict[str, torch.Tensor], kv: LayerKV, ctx: Context, cfg: ModelConfig
) -> torch.Tensor:
    h = h + self_attention(rms_norm(h, w["input_layernorm.weight"], cfg.norm_eps), w, kv, ctx, cfg)
    x = rms_norm(h, w["post_attention_layernorm.weight"], cfg.norm_eps)
    b = (lambda p: w[f"mlp.{p}_proj.bias"]) if cfg.mlp_bias else (lambda p: None)
    mlp = gated_mlp(
        x,
        w["mlp.gate_proj.weight"],
        w["mlp.up_proj.weight"],
        w["mlp.down_proj.weight"],
        cfg.act,
        b("gate"),
        b("up"),
        b("down"),
    )
    return h + mlp


def head(h: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """h [B, S, D] -> float32 logits [B, S, V] (matmul in h's dtype, as transformers does)."""
    return linear(rms_norm(h, w["norm.weight"], cfg.norm_eps), w["lm_head.weight"]).float()
