"""The HF-name -> unit table: every tensor save_pretrained writes lands in exactly one unit."""

from __future__ import annotations

from collections import Counter

import pytest
from model_cases import CASES, case_checkpoint

from zeroinf.models import ModelConfig, get_family, is_ignored_tensor


@pytest.mark.parametrize("case", list(CASES))
def test_every_tensor_maps_to_exactly_one_unit(case: str) -> None:
    config, tensors = case_checkpoint(case)
    cfg = ModelConfig.from_hf(config)
    units = get_family(cfg.model_type).unit_tensors(cfg)

    names = [u for u, _ in units]
    assert names == ["embed", *(f"layers.{i}" for i in range(cfg.num_layers)), "head"]
    counts = Counter(hf for _, table in units for hf in table.values())
    assert set(counts) == set(tensors)  # nothing missing, nothing invented
    repeated = {hf: n for hf, n in counts.items() if n > 1}
    if cfg.tie_embeddings:
        # The one exception: the head unit carries its own copy of the tied embedding.
        embed_tables = dict(units)["embed"].values()
        (tied,) = repeated
        assert repeated == {tied: 2} and tied in embed_tables and tied in units[-1][1].values()
    else:
        assert repeated == {}


@pytest.mark.parametrize(
    ("model_type", "name", "ignored"),
    [
        ("gpt_neox", "gpt_neox.layers.0.attention.bias", True),
        ("gpt_neox", "gpt_neox.layers.0.attention.masked_bias", True),
        ("gpt_neox", "gpt_neox.layers.3.attention.rotary_emb.inv_freq", True),
        ("gpt_neox", "gpt_neox.layers.0.attention.dense.bias", False),
        ("gpt_neox", "gpt_neox.layers.0.attention.query_key_value.bias", False),
        ("llama", "model.layers.0.self_attn.rotary_emb.inv_freq", True),
        ("llama", "model.layers.0.self_attn.q_proj.bias", False),
        ("opt", "model.decoder.layers.0.self_attn.k_proj.bias", False),
    ],
)
def test_ignored_tensors(model_type: str, name: str, ignored: bool) -> None:
    assert is_ignored_tensor(model_type, name) is ignored
