"""GPT-NeoX (Pythia): LayerNorm, fused per-head [q|k|v] projection, partial rotary, GELU MLP,
and the parallel residual h + attn(ln1(h)) + mlp(ln2(h)) (or sequential when turned off).
"""

from __future__ import annotations

import torch

from zeroinf.models.base import Context, LayerKV
from zeroinf.models.config import ModelConfig
from zeroinf.models.layers import apply_rotary, attend, layer_norm, linear, linear_act, rotary

# Checkpoints saved by older transformers hold the causal-mask and rotary buffers.
EMBED_TABLE = "embed_in.weight"  # the embed unit's token table (engine/gather.py)
IGNORED_TENSORS = (
    r"\.attention\.bias$",
    r"\.attention\.masked_bias$",
    r"\.rotary_emb\.inv_freq$",
)


def unit_tensors(cfg: ModelConfig) -> list[tuple[str, dict[str, str]]]:
    units = [("embed", {"embed_in.weight": "gpt_neox.embed_in.weight"})]
    for i in range(cfg.num_layers):
        keys = [
            f"{n}.{p}"
            for n in ("input_layernorm", "post_attention_layernorm")
            for p in ("weight", "bias")
        ]
        keys += ["attention.query_key_value.weight", "attention.dense.weight"]
        keys += ["attention.query_key_value.bias"] if cfg.qkv_bias else []
        keys += ["attention.dense.bias"] if cfg.o_bias else []
        keys += [
            f"mlp.{n}.{p}" for n in ("dense_h_to_4h", "dense_4h_to_h") for p in ("weight", "bias")
        ]
        units.append((f"layers.{i}", {k: f"gpt_neox.layers.{i}.{k}" for k in keys}))
    lm = "gpt_neox.embed_in.weight" if cfg.tie_embeddings else "embed_out.weight"
    head_keys = {
        f"final_layer_norm.{p}": f"gpt_neox.final_layer_norm.{p}" for p in ("weight", "bias")
    }
    units.append(("head", {**head_keys, "embed_out.weight": lm}))
    return units


def embed(
    x: torch.Tensor, w: dict[str, torch.Tensor], ctx: Context, cfg: ModelConfig
) -> torch.Tensor:
    """x: the ids' rows of the EMBED_TABLE [B, S, D], the hidden state as it is."""
    return x


def _ln(x: torch.Tensor, w: dict[str, torch.Tensor], name: str, cfg: ModelConfig) -> torch.Tensor:
    return layer_norm(x, w[f"{name}.weight"], w[f"{name}.bias"], cfg.norm_eps)


def _attention(
    x: torch.Tensor, w: dict[str, torch.Tensor], kv: LayerKV, ctx: Context, cfg: ModelConfig
) -> torch.Tensor:
    B, S, _ = x.shape
    H, Dh = cfg.num_heads, cfg.head_dim
    b = w["attention.query_key_value.bias"] if cfg.qkv_bias else None
    # The fused projection is laid out per head: [h0: q k v | h1: q k v | ...].
    qkv = linear(x, w["attention.query_key_value.weight"], b)  # [B, S, 3D]
    q, k, v = qkv.view(B, S, H, 3 * Dh).transpose(1, 2).chunk(3, dim=-1)  # [B, H, S, Dh] each
    cos, sin = rotary(ctx, cfg, x.dtype)  # [B, S, rotary_dim]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    o = attend(q, k, v, kv, ctx, scale=Dh**-0.5)  # [B, S, D]
    return linear(o, w["attention.dense.weight"], w["attention.dense.bias"] if cfg.o_bias else None)


def _mlp(x: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    up = linear_act(x, w["mlp.dense_h_to_4h.weight"], w["mlp.dense_h_to_4h.bias"], cfg.act)
    return linear(up, w["mlp.dense_4h_to_h.weight"], w["mlp.dense_4h_to_h.bias"])


def layer(
    h: torch.Tensor, w: dict[str, torch.Tensor], kv: LayerKV, ctx: Context, cfg: ModelConfig
) -> torch.Tensor:
    attn = _attention(_ln(h, w, "input_layernorm", cfg), w, kv, ctx, cfg)
    if cfg.parallel_residual:
        # Summation order as in transformers (mlp + attn + h): it matters in bf16.
        return _mlp(_ln(h, w, "post_attention_layernorm", cfg), w, cfg) + attn + h
    a = attn + h
    return _mlp(_ln(a, w, "post_attention_layernorm", cfg), w, cfg) + a


def head(h: torch.Tensor, w: dict[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    """h [B, S, D] -> float32 logits [B, S, V]."""
    return linear(_ln(h, w, "final_layer_norm", cfg), w["embed_out.weight"]).float()
