"""The KV cache: int8 storage (quantized as tokens are written) and decode in micro-batches.

Oracles: transformers itself, with a cache that rounds every key and value it stores through
the same int8 quantization (so the two differ only by what zeroinf computes, not by what int8
loses); the one-micro-batch run for micro-batches (float32: identical tokens)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import zeroinf
from kernels.kv_quant import dequantize_kv, quantize_kv
from zeroinf.convert import convert
from zeroinf.engine.kvcache import kv_token_bytes
from zeroinf.errors import ConfigError
from zeroinf.models import ModelConfig
from zeroinf.tiny import save_tiny_hf, tiny_prompts

NEW = 8


class FakeInt8Cache(DynamicCache):
    """transformers' cache, storing int8-rounded keys and values (quantize -> dequantize). A
    prefill (more than one token) attends over its own keys as computed (as transformers'
    QuantizedCache does); a one-token step reads the rounded cache."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # type: ignore[no-untyped-def]
        def rt(x: torch.Tensor) -> torch.Tensor:
            return dequantize_kv(*quantize_kv(x), x.dtype)

        k, v = super().update(rt(key_states), rt(value_states), layer_idx, *args, **kwargs)
        S = key_states.shape[2]
        if S == 1:
            return k, v
        return torch.cat((k[:, :, :-S], key_states), 2), torch.cat((v[:, :, :-S], value_states), 2)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
def test_int8_kv_matches_transformers_with_int8_rounded_cache(tmp_path: Path, family: str) -> None:
    save_tiny_hf(tmp_path / "hf", family, seed=5)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    path = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    ids, mask = tiny_prompts(hf.config.vocab_size)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                           do_sample=False, pad_token_id=0,
                           past_key_values=FakeInt8Cache(config=hf.config))  # fmt: skip
        plain = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                            do_sample=False, pad_token_id=0)  # fmt: skip
    with zeroinf.load(path, device="cpu", gpu_memory=None, kv_dtype="int8") as model:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
        assert model.kv_bytes(1, 1) == kv_token_bytes(model.config, 4, "int8")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if family == "llama":  # the int8 cache is in use: with this seed it changes some tokens
        assert not torch.equal(got, plain)


def test_int8_kv_bytes() -> None:
    cfg = ModelConfig(model_type="llama", num_layers=2, hidden_size=256, num_heads=2,
                      num_kv_heads=2, head_dim=128, intermediate_size=512, vocab_size=100,
                      max_positions=64, tie_embeddings=False, norm_eps=1e-5,
                      act="silu")  # fmt: skip
    assert kv_token_bytes(cfg, 2, None) == 2 * 2 * 2 * 128 * 2
    assert kv_token_bytes(cfg, 2, "int8") == 2 * 2 * 2 * (128 + 4)
    with pytest.raises(ConfigError, match="kv_dtype"):
        kv_token_bytes(cfg, 2, "int4")


@pytest.mark.parametrize("rows", [1, 2])
def test_decode_micro_batches_identical(tmp_path: Path, rows: int) -> None:
    save_tiny_hf(tmp_path / "hf", "llama", seed=6)
    path = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    ids, mask = tiny_prompts(64)
    with zeroinf.load(path, device="cpu", gpu_memory=None) as model:
        want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
        model.micro_batch = rows
        got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_int8_kv_refill_equals_one_at_a_time(tmp_path: Path) -> None:
    """Continuous refill moves an int8 cache's scales with its values (cache compaction)."""
    save_tiny_hf(tmp_path / "hf", "llama", seed=5)
    path = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(4, 64, (int(n),), generator=g).tolist() for n in (5, 1, 9, 3, 7, 1, 4)]
    with zeroinf.load(path, device="cpu", gpu_memory=None, kv_dtype="int8") as model:
        want = [model.generate([p], max_new_tokens=6)[0, len(p) :].tolist() for p in prompts]
        assert model._decode.kv  # generate() keeps its cache for a next call of its shape
        got = dict(
            (req.key, toks)
            for req, toks in model.generate_stream(
                prompts, batch_size=2, max_new_tokens=6, cache_tokens=16
            )  # fmt: skip
        )
    assert [got[i] for i in range(len(prompts))] == want
    assert not model._decode.kv  # freed before the stream allocated its own
