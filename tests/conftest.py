"""Shared fixtures: tiny Hugging Face folders saved by transformers itself, made once a session."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel module is first imported, and zeroinf's quantized
# path imports `kernels`: set it before any test module is collected (no CUDA: run the kernels
# in Triton's CPU interpreter).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _probe_cache(tmp_path_factory: pytest.TempPathFactory):
    """The machine probe's cache (zeroinf/engine/probe.py) in a session folder, not in the home
    of whoever runs the tests (subprocesses inherit it through the environment)."""
    old = os.environ.get("ZEROINF_CACHE_DIR")
    os.environ["ZEROINF_CACHE_DIR"] = str(tmp_path_factory.mktemp("probe-cache"))
    yield
    if old is None:
        del os.environ["ZEROINF_CACHE_DIR"]
    else:
        os.environ["ZEROINF_CACHE_DIR"] = old


def save_bin_variant(model: torch.nn.Module, folder: Path, shards: int = 2) -> None:
    """pytorch_model-0000i-of-0000n.bin shards + pytorch_model.bin.index.json, as transformers 4
    wrote them with safe_serialization=False (transformers 5 only writes safetensors). Tied
    tensors are saved under both names, as torch.save of a state dict does."""
    sd = model.state_dict()
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: sd[k] for k in part}, folder / fname)
        weight_map.update({k: fname for k in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_hf(model_type, weights="sharded"|"single"|"bin", dtype=torch.float32) -> a tiny HF
    folder (config.json, weights, tokenizer, generation_config.json). Cached for the session:
    treat it as read-only, copy it to modify it."""
    from zeroinf.tiny import save_tiny_hf

    made: dict[tuple[str, str, torch.dtype], Path] = {}

    def make(model_type: str, weights: str = "sharded", dtype: torch.dtype = torch.float32) -> Path:
        key = (model_type, weights, dtype)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"hf-{model_type}-{weights}")
            # A few shards, each holding tensors of several units (units span shards).
            shard = "400KB" if weights == "sharded" else None
            model = save_tiny_hf(folder, model_type, seed=3, max_shard_size=shard, dtype=dtype)
            if weights == "bin":
                for p in folder.glob("model*.safetensors*"):
                    p.unlink()
                save_bin_variant(model.to(dtype), folder)
            made[key] = folder
        return made[key]

    return make
