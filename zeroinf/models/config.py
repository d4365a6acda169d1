"""ModelConfig: one normalised view of a Hugging Face config.json, whatever the family.

Every HF naming quirk (n_heads vs num_attention_heads, rope_theta vs rope_parameters, rotary_pct,
ffn_dim, activation_function, ...) is resolved here and nowhere else. Defaults are those of the
transformers config classes, so a config.json that leaves a field out means what it means to
transformers. Anything that would change the math and is not implemented raises ConfigError
naming the field: never silently different results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from zeroinf.errors import ConfigError

MODEL_TYPES = ("llama", "mistral", "qwen2", "opt", "mixtral", "gpt_neox")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
# HF activation name -> the math it means (ACT2FN); the tanh variants agree to float32 rounding.
_ACT_ALIASES = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
}


@dataclass(frozen=True)
class Rope:
    """Rotary embedding parameters, resolved (no optional HF fields left to interpret)."""

    type: str = "default"  # one of ROPE_TYPES
    theta: float = 10000.0
    dim: int = 0  # rotated channels per head (== head_dim unless partial rotary)
    factor: float = 1.0  # linear, dynamic, llama3, yarn
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_positions: int = 0  # llama3, yarn
    attention_factor: float = 1.0  # yarn: multiplies cos and sin
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    truncate: bool = True  # yarn

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ConfigError(
                f"rope_parameters.rope_type: {self.type!r} is not supported "
                f"(supported: {', '.join(ROPE_TYPES)})"
            )
        if self.dim <= 0 or self.dim % 2:
            raise ConfigError(f"rotary dimension {self.dim} must be positive and even")
        if self.type != "default" and not self.factor > 0:
            raise ConfigError(f"rope_parameters.factor: {self.factor} must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """What the model math and the executor need to know about a checkpoint's architecture."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    tie_embeddings: bool
    intermediate_size: int
    act: str  # one of ACTIVATIONS
    norm_eps: float
    rope: Rope | None = None  # None: learned positions (OPT)
    qkv_bias: bool = False  # q/k/v projections (NeoX: the fused query_key_value)
    o_bias: bool = False  # attention output projection
    mlp_bias: bool = False
    sliding_window: int | None = None  # every layer attends to the last `sliding_window` keys
    # OPT
    word_embed_proj_dim: int = 0  # != hidden_size: project_in / project_out (opt-350m)
    norm_before: bool = True  # do_layer_norm_before
    final_norm: bool = True  # the decoder's final layer norm exists
    norm_affine: bool = True  # layer norms have weight and bias
    # Mixtral
    num_experts: int = 0
    experts_per_token: int = 0
    # GPT-NeoX
    parallel_residual: bool = False
    dtype: str | None = None  # the checkpoint's declared torch dtype, e.g. "bfloat16"

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type: {self.model_type!r} is not supported "
                f"(supported: {', '.join(MODEL_TYPES)})"
            )
        sizes = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim")
        for name in (*sizes, "vocab_size", "max_positions", "intermediate_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_key_value_heads: {self.num_kv_heads} does not divide "
                f"num_attention_heads {self.num_heads}"
            )
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act: {self.act!r} is not supported")
        if self.rope is not None and self.rope.dim > self.head_dim:
            raise ConfigError(f"rotary dim {self.rope.dim} exceeds head_dim {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window: must be positive, got {self.sliding_window}")
        if self.model_type == "mixtral" and not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok: {self.experts_per_token} must be in 1..num_local_experts "
                f"({self.num_experts})"
            )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_bytes(self, batch: int, seq: int, itemsize: int = 2) -> int:
        """Bytes of the KV cache of all layers for `batch` rows of `seq` positions."""
        return 2 * self.num_layers * batch * self.num_kv_heads * seq * self.head_dim * itemsize

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> ModelConfig:
        """Normalise a Hugging Face config.json (transformers 4.x or 5.x) into a ModelConfig."""
        mt = config.get("model_type")
        if mt not in MODEL_TYPES:
            raise ConfigError(
                f"model_type: {mt!r} is not supported (supported: {', '.join(MODEL_TYPES)})"
            )
        if config.get("quantization_config"):
            method = config["quantization_config"].get("quant_method", "?")
            raise ConfigError(
                f"quantization_config: pre-quantized checkpoints ({method}) are not supported"
            )
        if mt == "opt":
            return _opt(config)
        if mt == "gpt_neox":
            return _gpt_neox(config)
        return _llama_like(config, mt)


def _get(c: dict[str, Any], key: str, default: Any) -> Any:
    """c[key], or the transformers default when the key is missing or null; a value of another
    type than the default's (a number given as a string, say) is a ConfigError naming the key."""
    value = c.get(key)
    if value is None:
        return default
    _check_type(key, value, default)
    return value


def _req(c: dict[str, Any], key: str) -> Any:
    """A required size: a positive integer."""
    if c.get(key) is None:
        raise ConfigError(f"{key}: missing from config")
    _check_type(key, c[key], 1)
    return c[key]


def _check_type(key: str, value: Any, like: Any) -> None:
    if isinstance(like, bool):
        ok = isinstance(value, bool)
    elif isinstance(like, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(like, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(like, str):
        ok = isinstance(value, str)
    else:
        return  # dicts, lists, None defaults: checked where they are read
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not a {type(like).__name__}")


def _act(c: dict[str, Any], key: str, default: str) -> str:
    name = _get(c, key, default)
    if name not in _ACT_ALIASES:
        raise ConfigError(
            f"{key}: activation {name!r} is not supported (supported: {', '.join(_ACT_ALIASES)})"
        )
    return _ACT_ALIASES[name]


def _dtype(c: dict[str, Any]) -> str | None:
    return c.get("dtype") or c.get("torch_dtype")


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _rope(c: dict[str, Any], head_dim: int, theta: float, partial: float) -> Rope:
    """Merge 4.x (rope_theta + rope_scaling) and 5.x (rope_parameters) into one Rope."""
    params: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = c.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a dict, got {value!r}")
        if any(isinstance(v, dict) for v in value.values()):
            raise ConfigError(f"{key}: per-layer-type rope parameters are not supported")
        params.update(value)
    field = "rope_parameters" if "rope_parameters" in c else "rope_scaling"
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        supported = ", ".join(ROPE_TYPES)
        raise ConfigError(
            f"{field}.rope_type: {rope_type!r} is not supported (supported: {supported})"
        )
    for key in ("mrope_section", "short_factor", "long_factor"):
        if params.get(key) is not None:
            raise ConfigError(f"{field}.{key}: not supported")
    # rope_parameters (5.x) first, then the 4.x top-level names, then the family default.
    theta = float(_first(params.get("rope_theta"), c.get("rope_theta"), theta))
    partial = float(_first(params.get("partial_rotary_factor"), partial))
    dim = int(head_dim * partial)
    max_pos = _get(c, "max_position_embeddings", 0)
    # transformers gives a top-level original_max_position_embeddings priority (Phi3 style).
    orig = c.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings"
    )
    orig = int(orig or max_pos)

    def need(key: str) -> float:
        if params.get(key) is None:
            raise ConfigError(f"{field}.{key}: required by rope_type {rope_type!r}")
        return float(params[key])

    if rope_type == "default":
        return Rope(theta=theta, dim=dim)
    if rope_type in ("linear", "dynamic"):
        return Rope(type=rope_type, theta=theta, dim=dim, factor=need("factor"))
    if rope_type == "llama3":
        return Rope(
            type="llama3",
            theta=theta,
            dim=dim,
            factor=need("factor"),
            low_freq_factor=need("low_freq_factor"),
            high_freq_factor=need("high_freq_factor"),
            original_max_positions=orig,
        )
    # yarn, as transformers 5 resolves it (_compute_yarn_parameters).
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_pos / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = params.get("attention_factor")
    if attn is None:
        ms, ms_all = params.get("mscale"), params.get("mscale_all_dim")
        attn = mscale(factor, ms) / mscale(factor, ms_all) if ms and ms_all else mscale(factor)
    return Rope(
        type="yarn",
        theta=theta,
        dim=dim,
        factor=factor,
        original_max_positions=orig,
        attention_factor=float(attn),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)),
    )


def _llama_like(c: dict[str, Any], mt: str) -> ModelConfig:
    """llama, mistral, qwen2 and mixtral share one config layout."""
    hidden = _req(c, "hidden_size")
    heads = _req(c, "num_attention_heads")
    head_dim = _get(c, "head_dim", hidden // heads)
    theta = {"mixtral": 1e6}.get(mt, 10000.0)
    rope = _rope(c, head_dim, theta, _get(c, "partial_rotary_factor", 1.0))
    if rope.dim != head_dim:
        raise ConfigError(f"partial_rotary_factor: partial rotary is not supported for {mt}")
    sliding = None
    if mt in ("mistral", "mixtral"):
        # MistralConfig defaults to a 4096 window when the key is absent; Mixtral to none.
        sliding = c.get("sliding_window", 4096 if mt == "mistral" else None)
    elif mt == "qwen2" and c.get("use_sliding_window") and c.get("sliding_window", 4096):
        window = c.get("sliding_window", 4096)  # absent: Qwen2Config's default; null: none
        n = _req(c, "num_hidden_layers")
        types = c.get("layer_types") or [
            "sliding_attention" if i >= _get(c, "max_window_layers", 28) else "full_attention"
            for i in range(n)
        ]
        bad = set(types) - {"sliding_attention", "full_attention"}
        if bad:
            raise ConfigError(f"layer_types: {sorted(bad)} not supported")
        if len(set(types)) > 1:
            raise ConfigError(
                "max_window_layers/layer_types: a sliding window on only some layers is not "
                "supported"
            )
        sliding = window if types[0] == "sliding_attention" else None
    return ModelConfig(
        model_type=mt,
        num_layers=_req(c, "num_hidden_layers"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=_get(c, "num_key_value_heads", heads),
        head_dim=head_dim,
        vocab_size=_req(c, "vocab_size"),
        max_positions=_get(c, "max_position_embeddings", 2048 if mt == "llama" else 4096 * 32),
        tie_embeddings=bool(_get(c, "tie_word_embeddings", False)),
        intermediate_size=_req(c, "intermediate_size"),
        act=_act(c, "hidden_act", "silu"),
        norm_eps=float(_get(c, "rms_norm_eps", 1e-5 if mt == "mixtral" else 1e-6)),
        rope=rope,
        # Only these read a bias flag; Mistral and Mixtral projections never have biases.
        qkv_bias=mt == "qwen2" or (mt == "llama" and bool(_get(c, "attention_bias", False))),
        o_bias=bool(_get(c, "attention_bias", False)) if mt == "llama" else False,
        mlp_bias=bool(_get(c, "mlp_bias", False)) if mt == "llama" else False,
        sliding_window=sliding,
        num_experts=_get(c, "num_local_experts", 8) if mt == "mixtral" else 0,
        experts_per_token=_get(c, "num_experts_per_tok", 2) if mt == "mixtral" else 0,
        dtype=_dtype(c),
    )


def _opt(c: dict[str, Any]) -> ModelConfig:
    hidden = _req(c, "hidden_size")
    heads = _req(c, "num_attention_heads")
    if hidden % heads:
        raise ConfigError(f"num_attention_heads: {heads} does not divide hidden_size {hidden}")
    norm_before = bool(_get(c, "do_layer_norm_before", True))
    return ModelConfig(
        model_type="opt",
        num_layers=_req(c, "num_hidden_layers"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        vocab_size=_req(c, "vocab_size"),
        max_positions=_get(c, "max_position_embeddings", 2048),
        tie_embeddings=bool(_get(c, "tie_word_embeddings", True)),
        intermediate_size=_req(c, "ffn_dim"),
        act=_act(c, "activation_function", "relu"),
        norm_eps=1e-5,  # nn.LayerNorm's default; OPT does not configure it
        qkv_bias=bool(_get(c, "enable_bias", True)),
        o_bias=bool(_get(c, "enable_bias", True)),
        mlp_bias=bool(_get(c, "enable_bias", True)),
        word_embed_proj_dim=_get(c, "word_embed_proj_dim", hidden),
        norm_before=norm_before,
        final_norm=norm_before and not c.get("_remove_final_layer_norm", False),
        norm_affine=bool(_get(c, "layer_norm_elementwise_affine", True)),
        dtype=_dtype(c),
    )


def _gpt_neox(c: dict[str, Any]) -> ModelConfig:
    hidden = _req(c, "hidden_size")
    heads = _req(c, "num_attention_heads")
    if hidden % heads:
        raise ConfigError(f"num_attention_heads: {heads} does not divide hidden_size {hidden}")
    head_dim = hidden // heads
    # 4.x names (rotary_emb_base, rotary_pct); 5.x keeps both inside rope_parameters.
    theta = _first(c.get("rotary_emb_base"), c.get("rope_theta"), 10000.0)
    partial = _first(c.get("rotary_pct"), c.get("partial_rotary_factor"), 0.25)
    bias = bool(_get(c, "attention_bias", True))
    return ModelConfig(
        model_type="gpt_neox",
        num_layers=_req(c, "num_hidden_layers"),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        vocab_size=_req(c, "vocab_size"),
        max_positions=_get(c, "max_position_embeddings", 2048),
        tie_embeddings=bool(_get(c, "tie_word_embeddings", False)),
        intermediate_size=_req(c, "intermediate_size"),
        act=_act(c, "hidden_act", "gelu"),
        norm_eps=float(_get(c, "layer_norm_eps", 1e-5)),
        rope=_rope(c, head_dim, float(theta), float(partial)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=True,
        parallel_residual=bool(_get(c, "use_parallel_residual", True)),
        dtype=_dtype(c),
    )
