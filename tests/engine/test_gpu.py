"""The executor on a real GPU (run on the device machine: pytest -m gpu): the copy stream,
events and pinned memory paths, against transformers' own greedy generate in float32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zeroinf
from zeroinf.api import workspace_bytes
from zeroinf.convert import convert
from zeroinf.format import Checkpoint
from zeroinf.models import ModelConfig
from zeroinf.tiny import save_tiny_hf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("offload", ["cpu", "nvme"])
@pytest.mark.parametrize("prefetch", [1, 2])
def test_gpu_streaming_matches_transformers(tmp_path: Path, family: str, offload: str,
                                            prefetch: int) -> None:  # fmt: skip
    hf = save_tiny_hf(tmp_path / "hf", family, seed=2)
    ckpt = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    ids = torch.randint(4, hf.config.vocab_size, (4, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[3, :8] = 0
    with torch.no_grad():
        ref = hf.cuda().generate(
            ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, do_sample=False,
            min_new_tokens=12, pad_token_id=0,
        ).cpu()  # fmt: skip
    largest = max(u.nbytes for u in Checkpoint(ckpt).units)
    workspace = workspace_bytes(ModelConfig.from_hf(Checkpoint(ckpt).config), 4, 9)
    with zeroinf.load(ckpt, device="cuda", offload=offload, prefetch=prefetch, prefill_tokens=9,
                      gpu_memory=prefetch * largest + workspace) as model:  # fmt: skip
        assert all(p.tier != "gpu" for p in model.plan.placements)  # nothing resident
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12)
        captured, replayed = model.executor.graph_counts  # decode ran as CUDA graphs
        assert captured >= len(model.plan.placements) and replayed > captured
        again = model.generate(ids, attention_mask=mask, max_new_tokens=12)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(again, ref, rtol=0, atol=0)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
@pytest.mark.parametrize("quantize", [None, 4])
def test_cuda_graphs_equal_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 kv_dtype: str | None, quantize: int | None) -> None:  # fmt: skip
    """Replayed decode graphs give the eager run's tokens (bf16, int4 Triton kernels, int8 KV
    cache, decode in micro-batches of 3 rows over streamed and resident units)."""
    from zeroinf.convert import Quantization

    save_tiny_hf(
        tmp_path / "hf",
        "llama",
        seed=4,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    quant = Quantization(quantize, group_size=64) if quantize else None
    ckpt = convert(tmp_path / "hf", tmp_path / "zi", progress=False, dtype="bfloat16",
                   quantize=quant)  # fmt: skip
    ids = torch.randint(4, 64, (7, 9), generator=torch.Generator().manual_seed(5))
    units = Checkpoint(ckpt).units
    workspace = workspace_bytes(ModelConfig.from_hf(Checkpoint(ckpt).config), 2, 2048)
    slots = 2 * max(u.nbytes for u in units)
    budget = slots + (sum(u.nbytes for u in units) - slots) // 2 + workspace
    outs = []
    for graphs in ("1", "0"):
        monkeypatch.setenv("ZEROINF_CUDA_GRAPHS", graphs)
        with zeroinf.load(ckpt, device="cuda", gpu_memory=budget, kv_dtype=kv_dtype) as model:
            assert 0 < len(model.plan.streamed) < len(units)
            model.micro_batch = 3
            outs.append(model.generate(ids, max_new_tokens=10))
            assert (model.executor.graph_counts[1] > 0) == (graphs == "1")
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
