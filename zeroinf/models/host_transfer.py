"""Moving the host KV tier's tensors between the device and host memory (models/host_attention.py
uses them): to_host's pinned staging copies; CacheDMA, which has the copy engine put a
prompt's keys and values straight into a pinned host cache (an int8 one's quantized on the
device first); and HostWriter, which puts them into a pageable one off the calling thread.

The host KV tier, not the prefetcher, owns these side streams, their events and this staging:
they serve a KV cache whose use ends with each pass, not the units' weights the prefetcher
streams and keeps slots for.
"""

from __future__ import annotations

import ctypes
import functools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zeroinf.models.base import LayerKV
from zeroinf.models.layers import copy_wide, kv_pairs, write_kv


def to_host(*xs: torch.Tensor, sync: bool = True) -> list[torch.Tensor]:
    """Host copies of device tensors (pinned staging from torch's caching host allocator: cheap
    after the first step), complete on return when `sync`, else stream-ordered; host tensors
    as they are."""
    if not xs[0].is_cuda:
        return list(xs)
    outs = [torch.empty(x.shape, dtype=x.dtype, pin_memory=True) for x in xs]
    for o, x in zip(outs, xs, strict=True):
        o.copy_(x, non_blocking=True)
    if sync:
        torch.cuda.current_stream(xs[0].device).synchronize()
    return outs


def side_stream(
    streams: dict[torch.device, torch.cuda.Stream], device: torch.device
) -> torch.cuda.Stream:
    """streams[device], made at the first call for that device (a D2H stream of its own)."""
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


class HostWriter:
    """Writes a prompt's keys and values into host caches off the calling thread: submit()
    starts their copies to pinned staging on a side stream (a CUDA event marks them done),
    so the device computes on meanwhile, and queues the write;
    one thread waits for each copy and runs write_kv, in submission order. So a prefill's
    layers never wait for the host: syncing for every (chunk, layer) left the device idle
    while the host wrote (7.6 s of OPT-30B's batch-96 prefill against 3.9 s of matmuls).
    At most `depth` writes wait at once (their staging is pinned memory); flush() waits for
    all of them and raises the first error the thread met, with its chained cause."""

    def __init__(self, depth: int = 4) -> None:
        self.queue: queue.Queue[tuple[Any, LayerKV, torch.Tensor, torch.Tensor, int]] = queue.Queue(
            maxsize=depth
        )
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.streams: dict[torch.device, torch.cuda.Stream] = {}  # D2H, one per device
        self.busy_s = 0.0  # the thread's time in write_kv, and the bytes it wrote (benchmarks)
        self.written_bytes = 0

    def submit(self, kv: LayerKV, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """k, v [B, Hkv, S, D] (any device) into `kv` at indices start .. start+S-1, later."""
        self._raise()
        if k.is_cuda:  # copied on a side stream, beside the device's next computation
            computed = torch.cuda.Event()
            computed.record()
            side = side_stream(self.streams, k.device)
            with torch.cuda.stream(side):
                side.wait_event(computed)
                hk, hv = to_host(k, v, sync=False)
                done: Any = torch.cuda.Event(blocking=True)  # its waiter sleeps (InFlight)
                done.record(side)
            for x in (k, v):  # their memory is not reused before the side stream is done
                x.record_stream(side)
        else:  # the caller may reuse its tensors: the writer keeps copies
            hk, hv, done = k.clone(), v.clone(), None
        if self.thread is None or not self.thread.is_alive():
            self.thread = threading.Thread(target=self._run, name="zeroinf-kv-writer", daemon=True)
            self.thread.start()
        self.queue.put((done, kv, hk, hv, start))

    def flush(self, raise_errors: bool = True) -> None:
        """Wait until every submitted write is in its cache."""
        if self.thread is not None:
            self.queue.join()
        if raise_errors:
            self._raise()
        else:
            self.error = None

    def _raise(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise RuntimeError(f"host KV cache write failed: {e}") from e

    def _run(self) -> None:
        with torch.inference_mode():  # thread-local: the caches may be inference tensors
            self._loop()

    def _loop(self) -> None:
        while True:
            done, kv, hk, hv, start = self.queue.get()
            try:
                if self.error is None:  # after an error, the rest of the pass is dropped
                    if done is not None:
                        done.synchronize()
                    t = time.perf_counter()
                    write_kv(kv, hk, hv, start)
                    self.busy_s += time.perf_counter() - t
                    self.written_bytes += hk.nbytes + hv.nbytes
            except BaseException as e:  # raised to the caller by its next submit or flush
                self.error = e
            finally:
                del hk, hv  # the staging back to torch's pinned-memory cache
                self.queue.task_done()


writer = HostWriter()


@dataclass(frozen=True)
class Copy2D:
    """Where one 2D copy writes: `height` rows of `width` bytes, row r at dst + r * dst_pitch
    (the source packed: its rows `width` bytes apart)."""

    dst: int  # address of row 0's first byte
    dst_pitch: int
    width: int
    height: int


def cache_copy_2d(cache: torch.Tensor, start: int, shape: Sequence[int]) -> Copy2D:
    """The 2D copy that writes a packed x of `shape` [B, Hkv, S, D] into cache [B, Hkv, T, D]
    (a host cache of new_kv_cache, or a LayerKV.rows view of one) at indices start .. start+S-1:
    one row per (b, h), its S * D values contiguous in both. That needs the cache's (b, h)
    rows evenly spaced (stride(0) == Hkv * stride(1)) and each token's D values packed right
    after the previous token's (stride(2) == D, stride(3) == 1); ValueError otherwise."""
    B, Hkv, T, D = cache.shape
    S = shape[2]
    if tuple(shape) != (B, Hkv, S, D) or not 0 <= start <= T - S:
        raise ValueError(f"cannot copy {tuple(shape)} into a cache of {tuple(cache.shape)} "
                         f"at index {start}")  # fmt: skip
    if cache.stride(3) != 1 or cache.stride(2) != D or cache.stride(0) != Hkv * cache.stride(1):
        raise ValueError(f"the cache's strides {cache.stride()} are not one 2D copy's rows: "
                         "need stride(0) == Hkv * stride(1), stride(2) == D, "
                         "stride(3) == 1")  # fmt: skip
    item = cache.element_size()
    return Copy2D(dst=cache.data_ptr() + start * D * item, dst_pitch=cache.stride(1) * item,
                  width=S * D * item, height=B * Hkv)  # fmt: skip


CU_MEMORYTYPE_HOST = 1  # CUmemorytype (cuda.h)
CU_MEMORYTYPE_DEVICE = 2


class CudaMemcpy2D(ctypes.Structure):
    """cuda.h's CUDA_MEMCPY2D (ctypes pads it as the C compiler does)."""

    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t),
        ("srcMemoryType", ctypes.c_int), ("srcHost", ctypes.c_void_p),
        ("srcDevice", ctypes.c_ulonglong), ("srcArray", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t),
        ("dstMemoryType", ctypes.c_int), ("dstHost", ctypes.c_void_p),
        ("dstDevice", ctypes.c_ulonglong), ("dstArray", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t),
    ]  # fmt: skip


def packed(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [B, Hkv, S, D] in `dtype` with its (b, h) rows of S * D values back to back, the source
    cache_copy_2d's rows assume. (x.to(dtype, memory_format=torch.contiguous_format) is not
    that: for a transposed x of the right dtype it returns x itself.)"""
    x = x.to(dtype)
    if x.is_contiguous():
        return x
    return copy_wide(torch.empty(x.shape, dtype=dtype, device=x.device), x)


def device_to_host_2d(src: int, copy: Copy2D) -> CudaMemcpy2D:
    """The driver's arguments for `copy` from packed device memory at address `src`."""
    return CudaMemcpy2D(
        srcMemoryType=CU_MEMORYTYPE_DEVICE, srcDevice=src, srcPitch=copy.width,
        dstMemoryType=CU_MEMORYTYPE_HOST, dstHost=copy.dst, dstPitch=copy.dst_pitch,
        WidthInBytes=copy.width, Height=copy.height,
    )  # fmt: skip


@functools.cache
def _memcpy_2d_async() -> Callable[..., int]:
    """cuMemcpy2DAsync from the CUDA driver, loaded at first use (torch has loaded the driver
    by then; torch exposes no 2D copy to host memory)."""
    fn = ctypes.CDLL("libcuda.so.1").cuMemcpy2DAsync_v2
    fn.argtypes = (ctypes.POINTER(CudaMemcpy2D), ctypes.c_void_p)
    fn.restype = ctypes.c_int  # CUresult
    return fn


def copy_to_cache_async(
    kv: LayerKV, k: torch.Tensor, v: torch.Tensor, start: int, stream: torch.cuda.Stream
) -> int:
    """Queue on `stream` the copies of k, v [B, Hkv, S, D] (CUDA, any strides, computed before
    `stream`'s work) into the pinned host cache kv.k, kv.v [B, Hkv, T, D] at indices
    start .. start+S-1: one 2D copy each by the copy engine (cache_copy_2d), no host sync. An
    int8 cache's are quantized on `stream` first (kernels.kv_quant: write_kv's bytes), and
    their scales [B, Hkv, S] copied as [B, Hkv, S, 1] into kv.k_scale, kv.v_scale [B, Hkv, T].
    Returns the bytes queued."""
    queued = 0
    with torch.cuda.stream(stream):  # the stream's device current: the driver's context
        if kv.quantized:  # quantized on `stream`, which reads k, v: not reused before it is done
            for t in (k, v):
                t.record_stream(stream)
        for cache, x in kv_pairs(kv, k, v):
            if x.dim() == 3:  # scales [B, Hkv, S] as [B, Hkv, S, 1]
                cache, x = cache.unsqueeze(-1), x.unsqueeze(-1)
            src = packed(x, cache.dtype)  # [B, Hkv, S, D]
            args = device_to_host_2d(src.data_ptr(), cache_copy_2d(cache, start, x.shape))
            err = _memcpy_2d_async()(ctypes.byref(args), stream.cuda_stream)
            if err:
                raise RuntimeError(f"cuMemcpy2DAsync_v2 into the host KV cache failed: "
                                   f"CUresult {err}")  # fmt: skip
            for t in (x, src):  # their memory is not reused before the copy is done
                t.record_stream(stream)
            queued += src.nbytes
    return queued


class CacheDMA:
    """Puts a prompt's keys and values into pinned host caches by the copy engine: submit()
    queues their copies on a side stream (one per device) after the current stream's work so
    far, and records a "done" event; order() makes a stream wait for it (no host sync) before
    it reads a host cache; wait() blocks until every copy is done, at the end of a pass, so
    that no copy outlives it (the caller may then free or reuse the caches)."""

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}  # D2H, one per device
        self.done: dict[torch.device, torch.cuda.Event] = {}  # after the last copies queued
        self.copied_bytes = 0  # bytes queued (benchmarks)

    def submit(self, kv: LayerKV, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """k, v [B, Hkv, S, D] (CUDA) into the pinned host cache `kv` at indices
        start .. start+S-1, stream-ordered after their computation."""
        side = side_stream(self.streams, k.device)
        side.wait_stream(torch.cuda.current_stream(k.device))  # k, v computed
        try:
            self.copied_bytes += copy_to_cache_async(kv, k, v, start, side)
        finally:  # also after a failed copy: wait() covers any copy queued before it
            done = torch.cuda.Event(blocking=True)  # its waiter sleeps (InFlight says why)
            done.record(side)
            self.done[k.device] = done

    def order(self, device: torch.device) -> None:
        """The current stream of `device` waits for every copy queued so far (on the device:
        the host goes on), before anything it runs reads a host cache."""
        done = self.done.get(device)
        if done is not None:
            torch.cuda.current_stream(device).wait_event(done)

    def wait(self) -> None:
        """Every queued copy is in its cache (a host sync)."""
        for done in self.done.values():
            done.synchronize()
        self.done.clear()


cache_dma = CacheDMA()
