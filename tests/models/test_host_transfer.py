"""The pinned host KV cache and the copy engine's writes into it (models/host_transfer.py
CacheDMA, engine/kvcache.py new_kv_cache): on a CPU, the 2D copy's geometry (each row copied
with memmove where the driver would copy it, against write_kv), its refusals, the driver
struct's layout, and which caches new_kv_cache pins (pinning faked); on a GPU, the copy engine's
bytes against write_kv's."""

from __future__ import annotations

import ctypes
import logging

import pytest
import torch

import zeroinf.engine.kvcache as kvcache
import zeroinf.io.memory as memory
from zeroinf.engine.kvcache import new_kv_cache
from zeroinf.models.base import LayerKV
from zeroinf.models.config import ModelConfig
from zeroinf.models.host_transfer import (
    CU_MEMORYTYPE_DEVICE,
    CU_MEMORYTYPE_HOST,
    CudaMemcpy2D,
    cache_copy_2d,
    device_to_host_2d,
    packed,
)
from zeroinf.models.layers import write_kv

B, HKV, T, D = 4, 3, 10, 8


def _cfg(layers: int = 3) -> ModelConfig:
    return ModelConfig(model_type="llama", num_layers=layers, hidden_size=16 * HKV,
                       num_heads=HKV, num_kv_heads=HKV, head_dim=D, intermediate_size=8,
                       vocab_size=8, max_positions=64, tie_embeddings=False, norm_eps=1e-5,
                       act="silu")  # fmt: skip


def _copy_rows(cache: torch.Tensor, x: torch.Tensor, start: int) -> None:
    """What cuMemcpy2D does with cache_copy_2d's geometry, row by row on the CPU."""
    src = packed(x, cache.dtype)  # what copy_to_cache_async sends
    c = cache_copy_2d(cache, start, x.shape)
    for r in range(c.height):
        ctypes.memmove(c.dst + r * c.dst_pitch, src.data_ptr() + r * c.width, c.width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,start,S", [((0, B), 0, 6), ((1, 3), 4, 3), ((3, 4), 9, 1)])
def test_2d_copy_lands_where_write_kv_writes(
    dtype: torch.dtype, rows: tuple[int, int], start: int, S: int
) -> None:
    """The whole cache or a rows(a, b) view, at index 0 or later, from a strided source."""
    g = torch.Generator().manual_seed(start)
    base = torch.randn(B, HKV, T, D, generator=g).to(dtype)
    got, want = LayerKV(base.clone(), base.clone(), host=True), LayerKV(base, base.clone())
    a, b = rows
    x = torch.randn(b - a, S, HKV, D, generator=g).to(dtype).transpose(1, 2)  # not contiguous
    _copy_rows(got.rows(a, b).k, x, start)
    write_kv(want.rows(a, b), x, x, start)
    assert torch.equal(got.k, want.k)


def test_2d_copy_geometry_by_hand() -> None:
    """Row (b, h) of a rows(1, 3) view at index 4: its first byte, pitch, width and count."""
    cache = torch.zeros(B, HKV, T, D, dtype=torch.float16)
    c = cache_copy_2d(cache[1:3], 4, (2, HKV, 5, D))
    assert c.dst == cache.data_ptr() + 2 * (1 * HKV * T * D + 4 * D)
    assert (c.dst_pitch, c.width, c.height) == (2 * T * D, 2 * 5 * D, 2 * HKV)


def test_2d_copy_refuses_what_one_copy_cannot_write() -> None:
    cache = torch.zeros(B, HKV, T, D)
    for view in (cache[:, 1:], cache[..., :4], cache.transpose(0, 1)):  # rows not one pitch apart
        shape = (view.shape[0], view.shape[1], 2, view.shape[3])
        with pytest.raises(ValueError, match="not one 2D copy's rows"):
            cache_copy_2d(view, 0, shape)
    for start, shape in ((9, (B, HKV, 2, D)), (-1, (B, HKV, 1, D)), (0, (B, HKV, 1, D + 1))):
        with pytest.raises(ValueError, match="cannot copy"):
            cache_copy_2d(cache, start, shape)


def test_memcpy2d_struct_has_cudas_layout() -> None:
    """CUDA_MEMCPY2D on a 64-bit ABI: 7 fields of 8 bytes per side (the memory type an int
    padded to 8), then width and height: 128 bytes. The arguments of a device-to-host copy."""
    assert ctypes.sizeof(CudaMemcpy2D) == 128
    offsets = {name: getattr(CudaMemcpy2D, name).offset for name, _ in CudaMemcpy2D._fields_}
    assert offsets["srcMemoryType"] == 16 and offsets["srcHost"] == 24
    assert offsets["dstXInBytes"] == 56 and offsets["dstPitch"] == 104
    assert offsets["WidthInBytes"] == 112 and offsets["Height"] == 120
    cache = torch.zeros(B, HKV, T, D)
    args = device_to_host_2d(0x7000, cache_copy_2d(cache, 2, (B, HKV, 3, D)))
    assert (args.srcMemoryType, args.srcDevice, args.srcPitch) == (CU_MEMORYTYPE_DEVICE, 0x7000,
                                                                   3 * D * 4)  # fmt: skip
    assert (args.dstMemoryType, args.dstHost, args.dstPitch) == (
        CU_MEMORYTYPE_HOST, cache.data_ptr() + 2 * D * 4, T * D * 4)  # fmt: skip
    assert (args.WidthInBytes, args.Height, args.srcXInBytes, args.dstY) == (3 * D * 4, B * HKV,
                                                                             0, 0)  # fmt: skip


def test_host_cache_on_a_cpu_is_zeroed_and_not_pinned() -> None:
    kv = new_kv_cache(_cfg(), B, T, torch.float16, torch.device("cpu"), host_layers=(0, 2))
    assert [c.host for c in kv] == [True, False, True] and not any(c.pinned for c in kv)
    assert all(not c.k.is_pinned() and not c.k.any() and not c.v.any() for c in kv)


def _fake_pinning(monkeypatch: pytest.MonkeyPatch, fails: bool) -> list[bool]:
    """aligned_empty without CUDA: pin=True gives plain memory, bytes of 1 (to show that
    new_kv_cache writes nothing over it: registration leaves it zero-filled), or raises as a
    failed cudaHostRegister does. Returns the pin arguments it was called with."""
    calls: list[bool] = []
    real = memory.aligned_empty

    def fake(nbytes: int, pin: bool = False) -> torch.Tensor:
        calls.append(pin)
        if pin and fails:
            raise RuntimeError("cudaHostRegister of 1 KiB failed: cudaError 2")
        return real(nbytes).fill_(1) if pin else real(nbytes)

    monkeypatch.setattr(kvcache, "aligned_empty", fake)
    monkeypatch.setattr(memory, "aligned_empty", fake)  # PinnedArena's
    return calls


def test_host_cache_for_a_cuda_device_is_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 16-bit cache whose layers are all on the host (no device tensor made): each k, v
    pinned, the flag set (and kept by rows()); an int8 cache's k, v and scales too."""
    calls = _fake_pinning(monkeypatch, fails=False)
    cuda = torch.device("cuda", 0)
    kv = new_kv_cache(_cfg(), B, T, torch.float16, cuda, host_layers=range(3))
    assert calls == [True] * 6
    assert all(c.host and c.pinned and c.rows(1, 2).pinned for c in kv)
    assert all(c.k.shape == (B, HKV, T, D) and c.k.dtype == torch.float16 for c in kv)
    assert all(bool((x.view(torch.uint8) == 1).all()) for c in kv for x in (c.k, c.v))
    assert len({c.k.data_ptr() for c in kv} | {c.v.data_ptr() for c in kv}) == 6
    calls.clear()
    kv = new_kv_cache(_cfg(), B, T, torch.float16, cuda, "int8", host_layers=range(3))
    assert calls and all(calls)  # (4 KiB slots here: a chunk each)
    assert all(c.host and c.pinned and c.quantized and c.rows(1, 2).pinned for c in kv)
    assert all(c.k.shape == c.v.shape == (B, HKV, T, D) and c.k.dtype == torch.int8 for c in kv)
    assert all(c.k_scale.shape == c.v_scale.shape == (B, HKV, T) for c in kv)
    assert all(c.k_scale.dtype == torch.float32 and c.k_scale.is_contiguous() for c in kv)
    ptrs = {x.data_ptr() for c in kv for x in (c.k, c.v, c.k_scale, c.v_scale)}
    assert len(ptrs) == 12


def test_failed_pinning_warns_once_and_falls_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _fake_pinning(monkeypatch, fails=True)
    with caplog.at_level(logging.WARNING, logger="zeroinf"):
        kv = new_kv_cache(_cfg(), B, T, torch.float16, torch.device("cuda"), host_layers=(0, 1, 2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "pinning the host KV cache (" in warnings[0] and "cudaError 2" in warnings[0]
    assert all(c.host and not c.pinned and not c.k.any() and not c.v.any() for c in kv)


CASES = [(torch.float16, None), (torch.float32, None), (torch.float16, "int8"),
         (torch.bfloat16, "int8")]  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,kv_dtype", CASES)
def test_copy_engine_writes_what_write_kv_writes(dtype: torch.dtype, kv_dtype: str | None) -> None:
    """A pinned cache of new_kv_cache, written by CacheDMA (strided device sources): a prompt
    at index 0 over every row, then one at a later index into a rows(a, b) view; the bytes
    equal write_kv's into a copy (int8: quantized on the device by the Triton kernel, on the
    host by the reference), both for a stream ordered after the copies and for the host after
    the pass's end, and take_stats counts them."""
    from zeroinf.models.host_attention import finish_host_work, take_stats
    from zeroinf.models.host_transfer import cache_dma

    dev = torch.device("cuda", torch.cuda.current_device())  # as a tensor's device reads
    kv = new_kv_cache(_cfg(1), B, T, dtype, dev, kv_dtype, host_layers=(0,))[0]
    tensors = [kv.k, kv.v] + ([kv.k_scale, kv.v_scale] if kv_dtype else [])
    assert kv.pinned and all(x.is_pinned() for x in tensors)
    want = LayerKV(*(x.clone() for x in tensors))  # type: ignore[arg-type]
    take_stats()
    g = torch.Generator(device=dev).manual_seed(0)
    sent = 0
    for (a, b), start, S in (((0, B), 0, 6), ((1, 3), 6, 4)):
        k, v = (torch.randn(b - a, S, HKV, D, generator=g, device=dev, dtype=dtype).transpose(1, 2)
                for _ in "kv")  # fmt: skip
        cache_dma.submit(kv.rows(a, b), k, v, start)
        write_kv(want.rows(a, b), k.cpu(), v.cpu(), start)
        # int8: a byte per element and a float32 scale per D of them
        sent += (k.numel() * (1 + 4 / D) * 2) if kv_dtype else k.nbytes + v.nbytes
    cache_dma.order(dev)  # the current stream reads the cache after the copies, the host goes on
    seen = kv.v.to(dev, non_blocking=True)
    finish_host_work()
    refs = [want.k, want.v] + ([want.k_scale, want.v_scale] if kv_dtype else [])
    for got, ref in zip(tensors, refs, strict=True):
        assert torch.equal(got, ref)
    assert torch.equal(seen.cpu(), want.v)
    assert take_stats()["dma_bytes"] == sent
