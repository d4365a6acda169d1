"""ModelConfig.from_hf: HF naming quirks normalised, and ConfigError for what is not implemented."""

from __future__ import annotations

import pytest
from model_cases import case_checkpoint

from zeroinf.errors import ConfigError
from zeroinf.models import SUPPORTED_MODEL_TYPES, ModelConfig, get_family
from zeroinf.models.config import Rope

LLAMA = case_checkpoint("llama-gqa")[0]
NEOX = case_checkpoint("neox")[0]


def llama(**changes: object) -> dict:
    c = {**LLAMA, **changes}
    return {k: v for k, v in c.items() if v is not None}


def qwen2(**changes: object) -> dict:
    c = {**case_checkpoint("qwen2")[0], "layer_types": None, **changes}
    return {k: v for k, v in c.items() if v is not None}


MIXED = ["full_attention", "sliding_attention", "sliding_attention"]


def test_required_fields() -> None:
    cfg = ModelConfig.from_hf(LLAMA)
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size) == ("llama", 3, 96)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (6, 2, 16)
    assert (cfg.vocab_size, cfg.max_positions, cfg.tie_embeddings) == (384, 256, False)
    assert cfg.kv_bytes(batch=2, seq=10, itemsize=2) == 2 * 3 * 2 * 2 * 10 * 16 * 2


def test_transformers4_rope_names_mean_the_same() -> None:
    """4.x wrote rope_theta + rope_scaling ("type" or "rope_type"); 5.x writes rope_parameters."""
    v5 = llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})
    for key in ("type", "rope_type"):
        v4 = llama(
            rope_parameters=None, rope_theta=5e5, rope_scaling={key: "linear", "factor": 2.0}
        )
        assert ModelConfig.from_hf(v4) == ModelConfig.from_hf(v5)
    assert ModelConfig.from_hf(v5).rope == Rope(type="linear", theta=5e5, dim=16, factor=2.0)


def test_transformers4_neox_names_mean_the_same() -> None:
    v4 = {k: v for k, v in NEOX.items() if k != "rope_parameters"}
    v4.update(rotary_pct=0.5, rotary_emb_base=10000)
    assert ModelConfig.from_hf(v4) == ModelConfig.from_hf(NEOX)
    assert ModelConfig.from_hf(NEOX).rope.dim == 8  # 16 * 0.5


def test_defaults_follow_transformers_when_keys_are_missing() -> None:
    minimal = {k: LLAMA[k] for k in ("model_type", "hidden_size", "num_attention_heads")}
    minimal.update(num_hidden_layers=2, vocab_size=10, intermediate_size=8)
    cfg = ModelConfig.from_hf(minimal)
    assert (cfg.num_kv_heads, cfg.act, cfg.norm_eps, cfg.rope.theta) == (6, "silu", 1e-6, 1e4)
    mistral = ModelConfig.from_hf({**minimal, "model_type": "mistral"})
    assert mistral.sliding_window == 4096  # MistralConfig's default window


def test_family_lookup() -> None:
    for mt in SUPPORTED_MODEL_TYPES:
        assert callable(get_family(mt).layer)
    with pytest.raises(ConfigError, match="model_type.*gpt2.*supported: llama"):
        get_family("gpt2")


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (llama(model_type="gpt2"), "model_type"),
        (llama(hidden_act="quick_gelu"), "hidden_act"),
        (llama(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "rope_type"),
        (llama(rope_parameters={"rope_type": "magic", "rope_theta": 1e4}), "rope_type"),
        (llama(rope_parameters=None, rope_scaling={"type": "su", "factor": 2.0}), "rope_scaling"),
        (llama(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
        (llama(rope_parameters={"rope_type": "linear"}), "factor"),
        (llama(rope_parameters={"rope_type": "default", "mrope_section": [2, 2]}), "mrope_section"),
        (llama(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (llama(num_key_value_heads=4), "num_key_value_heads"),
        (llama(quantization_config={"quant_method": "gptq"}), "quantization_config"),
        (llama(hidden_size=None), "hidden_size"),
        ({**case_checkpoint("opt")[0], "activation_function": "tanh"}, "activation_function"),
        ({**NEOX, "hidden_act": "gelu_10"}, "hidden_act"),
        (
            qwen2(use_sliding_window=True, sliding_window=5, max_window_layers=1),
            "max_window_layers",
        ),
        (qwen2(use_sliding_window=True, sliding_window=5, layer_types=MIXED), "layer_types"),
    ],
)
def test_unsupported_raises_config_error_naming_the_field(config: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf(config)
