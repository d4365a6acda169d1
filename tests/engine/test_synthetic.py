"""zeroinf-bench's random shapes are laid out exactly as zeroinf-convert lays out a real
checkpoint of the same config (oracle: converting what transformers itself saved)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zeroinf.convert import convert
from zeroinf.format import Checkpoint
from zeroinf.synthetic import synthetic_manifest
from zeroinf.tiny import TINY_CONFIGS, save_tiny_hf


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_synthetic_manifest_matches_a_converted_checkpoint(tmp_path: Path, model_type: str) -> None:
    save_tiny_hf(tmp_path / "hf", model_type, tokenizer=False)
    real = Checkpoint(convert(tmp_path / "hf", tmp_path / "zi", dtype="float16", progress=False))
    syn = synthetic_manifest(real.config, torch.float16)
    layout = lambda us: [(u.name, u.nbytes, [(t.name, t.dtype, t.shape, t.offset)  # noqa: E731
                                             for t in u.tensors]) for u in us]  # fmt: skip
    assert layout(syn.units) == layout(real.units)
