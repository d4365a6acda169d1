"""The tiny model configurations every models test runs over (overrides of tiny.TINY_CONFIGS).

Together they cover: GQA, MQA and MHA; tied and untied embeddings; odd sizes and an explicit
head_dim; biases on and off; every supported rope type; sliding windows small enough to matter;
OPT post-LN with project_in/out; MoE top-1 and top-2; NeoX sequential residual and partial rotary.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
from driver import saved_checkpoint

from zeroinf.tiny import tiny_hf_model

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-gqa": ("llama", {}),
    "llama-mha-tied-bias-headdim": (
        "llama",
        dict(
            hidden_size=80,
            num_attention_heads=5,
            num_key_value_heads=5,
            head_dim=24,
            intermediate_size=131,
            tie_word_embeddings=True,
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
    "llama-mqa-gelu-tanh": ("llama", dict(num_key_value_heads=1, hidden_act="gelu_pytorch_tanh")),
    "llama-rope-linear": (
        "llama",
        dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=500000.0)),
    ),
    # max_position_embeddings below prompt + new tokens: the NTK base grows while decoding.
    "llama-rope-dynamic": (
        "llama",
        dict(
            max_position_embeddings=16,
            rope_parameters=dict(rope_type="dynamic", factor=2.0, rope_theta=10000.0),
        ),
    ),
    "llama-rope-llama3": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
                rope_theta=10000.0,
            )
        ),
    ),
    "llama-rope-yarn": (
        "llama",
        dict(
            rope_parameters=dict(
                rope_type="yarn", factor=4.0, original_max_position_embeddings=32, rope_theta=1e4
            )
        ),
    ),
    "mistral-window": ("mistral", dict(sliding_window=4)),
    "mistral-mha-tied": ("mistral", dict(num_key_value_heads=6, tie_word_embeddings=True)),
    "qwen2": ("qwen2", {}),
    "qwen2-window-tied": (
        "qwen2",
        dict(
            use_sliding_window=True, sliding_window=5, max_window_layers=0, tie_word_embeddings=True
        ),
    ),
    "opt": ("opt", {}),
    "opt-postln-project": ("opt", dict(do_layer_norm_before=False, word_embed_proj_dim=64)),
    "opt-nobias-noaffine-gelu-untied": (
        "opt",
        dict(
            enable_bias=False,
            layer_norm_elementwise_affine=False,
            activation_function="gelu",
            tie_word_embeddings=False,
        ),
    ),
    "mixtral": ("mixtral", {}),
    "mixtral-top1-mha-tied-window": (
        "mixtral",
        dict(
            num_local_experts=3,
            num_experts_per_tok=1,
            num_key_value_heads=6,
            tie_word_embeddings=True,
            sliding_window=5,
        ),
    ),
    "neox": ("gpt_neox", {}),
    "neox-sequential-full-rotary-tied": (
        "gpt_neox",
        dict(
            use_parallel_residual=False,
            rotary_pct=1.0,
            tie_word_embeddings=True,
            attention_bias=False,
        ),
    ),
    "neox-rope-linear-gelu-new": (
        "gpt_neox",
        dict(
            rotary_pct=0.25,
            hidden_act="gelu_new",
            rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0),
        ),
    ),
}


@cache
def case_model(case: str) -> torch.nn.Module:
    model_type, overrides = CASES[case]
    model = tiny_hf_model(model_type, seed=1, **overrides)
    # Random weights emit the eos id now and then; generation must not stop early.
    model.generation_config.eos_token_id = None
    return model


@cache
def case_checkpoint(case: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, file tensors) as save_pretrained writes them for the case's model."""
    return saved_checkpoint(case_model(case))
