"""Model families: pure math over plain tensors, one module per family (protocol: base.py).

fam = get_family(cfg.model_type)
fam.unit_tensors(cfg)                   -> [(unit name, {local key: HF tensor name})]
fam.embed(rows, w, ctx, cfg) / fam.layer(h, w, kv, ctx, cfg) / fam.head(h, w, cfg)
"""

from __future__ import annotations

import re
from types import ModuleType

from zeroinf.errors import ConfigError
from zeroinf.models.config import MODEL_TYPES, ModelConfig

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelConfig", "get_family", "is_ignored_tensor"]

SUPPORTED_MODEL_TYPES: tuple[str, ...] = MODEL_TYPES

# model_type -> module under zeroinf.models; Mistral and Qwen2 are Llama with config flags.
_FAMILY_MODULES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "opt": "opt",
    "mixtral": "mixtral",
    "gpt_neox": "gpt_neox",
}


def get_family(model_type: str) -> ModuleType:
    """The family module implementing `model_type` (see base.py for what it exports)."""
    if model_type not in _FAMILY_MODULES:
        raise ConfigError(
            f"model_type: {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    import importlib

    return importlib.import_module(f"zeroinf.models.{_FAMILY_MODULES[model_type]}")


def is_ignored_tensor(model_type: str, name: str) -> bool:
    """True for an HF tensor that a checkpoint may hold but that transformers itself ignores on
    load (saved buffers such as rotary inv_freq or NeoX's causal-mask `attention.bias`). A
    converter skips these; any other tensor not named by unit_tensors is an error."""
    patterns = getattr(get_family(model_type), "IGNORED_TENSORS", ())
    return any(re.search(p, name) for p in patterns)
