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
        model.prefetcher.copy_events = []  # the second call's copies timed (zeroinf-bench --trace)
        again = model.generate(ids, attention_mask=mask, max_new_tokens=12)
        prof = model.prefetcher.copy_profile()
        assert prof["copies"] >= len(model.plan.streamed) and prof["copy_bytes_per_s"] > 0
        assert 0 < prof["busy_fraction"] <= 1 and "gather_s_per_unit" not in prof  # one rank
        p10, p50, p90 = prof["decode_copy_bytes_per_s_p10_p50_p90"]
        assert 0 < p10 <= p50 <= p90
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


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_host_kv_tier_on_the_gpu(tmp_path: Path, family: str, dtype: str) -> None:
    """The host KV tier on a GPU (pinned staging, the writer's side stream, the native kernel),
    all layers' cache in host memory or the "split" tier's share:
    float32 tokens equal transformers' greedy generate (left padding, prefill in row chunks,
    micro-batches of 3 rows, a second call reusing the cache); float16 the device tier's, in
    all but the rare near-tie (at most one sequence may part ways)."""
    hf = save_tiny_hf(tmp_path / "hf", family, seed=3)
    ckpt = convert(tmp_path / "hf", tmp_path / "zi", progress=False, dtype=dtype)
    ids = torch.randint(4, hf.config.vocab_size, (7, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[5, :8] = 0
    outs = {}
    planned = dict(batch_size="auto", prompt_len=9, max_new_tokens=12, max_batch_size=8)
    for tier in ("cpu", "gpu", "split"):  # "split": the planner's layers on the device
        kw = planned if tier == "split" else {}
        with zeroinf.load(ckpt, device="cuda", kv_tier=tier, prefill_tokens=18, **kw) as model:
            assert model.plan.kv_tier == tier
            model.micro_batch = 3
            outs[tier] = model.generate(ids, attention_mask=mask, max_new_tokens=12)
            again = model.generate(ids, attention_mask=mask, max_new_tokens=12)
            torch.testing.assert_close(again, outs[tier], rtol=0, atol=0)
    if dtype == "float32":
        with torch.no_grad():
            ref = hf.cuda().generate(
                ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, do_sample=False,
                min_new_tokens=12, pad_token_id=0,
            ).cpu()  # fmt: skip
        torch.testing.assert_close(outs["cpu"], ref, rtol=0, atol=0)
        torch.testing.assert_close(outs["split"], ref, rtol=0, atol=0)
    else:
        assert (outs["cpu"] != outs["gpu"]).any(1).sum() <= 1
        assert (outs["split"] != outs["gpu"]).any(1).sum() <= 1


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_host_kv_tier_int8_on_the_gpu(tmp_path: Path, dtype: str) -> None:
    """An int8 host cache on a GPU: pinned, the prompt's keys quantized on the device and put
    in by DMA, decode steps by the native kernel reading int8; its tokens equal the device
    tier's int8 run (Triton's decode attention over the same bytes), float32 exactly, float16
    in all but the rare near-tie; a second call on the same cache gives the same tokens."""
    from zeroinf.models.host_attention import take_stats

    save_tiny_hf(tmp_path / "hf", "llama", seed=4)
    ckpt = convert(tmp_path / "hf", tmp_path / "zi", progress=False, dtype=dtype)
    ids = torch.randint(4, 200, (7, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[2, :5] = 0
    outs = {}
    for tier in ("cpu", "gpu"):
        with zeroinf.load(ckpt, device="cuda", kv_tier=tier, kv_dtype="int8",
                          prefill_tokens=18) as model:  # fmt: skip
            take_stats()
            outs[tier] = model.generate(ids, attention_mask=mask, max_new_tokens=12)
            stats = take_stats()
            again = model.generate(ids, attention_mask=mask, max_new_tokens=12)
            torch.testing.assert_close(again, outs[tier], rtol=0, atol=0)
        if tier == "cpu":  # the kernel ran every decode step; the prompt went by DMA
            assert stats["kernel_calls"] > 0 and stats["dma_bytes"] > 0
            assert stats["writer_bytes"] == 0
    if dtype == "float32":
        torch.testing.assert_close(outs["cpu"], outs["gpu"], rtol=0, atol=0)
    else:
        assert (outs["cpu"] != outs["gpu"]).any(1).sum() <= 1


@pytest.mark.parametrize("inference", [False, True])
def test_host_memory_probe_runs_its_copies(inference: bool) -> None:
    """The host memory rate counts H2D copies beside the CPU's reads, in or out of inference
    mode (the copier thread has its own mode): more than the CPU's reads alone would give."""
    from zeroinf.engine.probe import concurrent_with_h2d, measure_host_memory

    cuda = torch.device("cuda")
    x = torch.ones(16 << 20)
    with torch.inference_mode(inference):
        copied, calls = concurrent_with_h2d(lambda: x.sum(), cuda, 0.3)
        assert copied > 1e9 and calls > 0
        assert measure_host_memory(cuda, 64 << 20, 0.3) > copied
        assert measure_host_memory(cuda, 0, 0.3, over=[x]) > copied  # a run's cache
