"""Attention over a KV cache in host memory (the "cpu" KV tier, as FlexGen runs it): the one
place where a layer's computation leaves the compute device. Family files never see it: they
call models.layers.attend, which comes here for a cache whose LayerKV.host is set (importing
this module when it first does: this module uses layers' sdpa).

Per layer and step: q, k, v (and the step's mask) go to the host through pinned staging buffers;
a decode step then runs the native kernel (native/host_attn.c),
which writes k, v into the cache and attends in one pass over each (row, kv head)'s keys and
values on all of torch's intra-op threads. On a GPU the kernel is queued in the compute stream
as a host function, after those copies and before the output's copy back: no host sync, and
the calling thread queues the next layers meanwhile (InFlight keeps the buffers alive, and the
executor waits for it all at the end of each pass). The kernel is bound by host memory bandwidth
(106 GB/s at OPT-30B's batch-96 step on the H100 machine's 16 cores, against 50-61 GB/s for
torch's CPU SDPA, which converts 16-bit inputs far below memory speed: docs/benchmarks.md).
An int8 cache is read by the same kernel (int8 and its scales, dequantized in registers;
this step's k, v quantized as written, as kernels.kv_quant's reference does). Anything else (a
chunk of several tokens over earlier entries) writes with write_kv and attends with torch SDPA
on the CPU in chunks of rows and kv heads, so that temporaries (keys dequantized or
expanded for GQA) stay under CHUNK_BYTES. Without the native module (no compiler at install) a
warning says so once and torch's path serves every step. The output [B, S, H * D] goes back to
the compute device without a sync (stream-ordered, from a pinned buffer). The GPU waits for
each layer's host attention; the prefetcher's copy stream keeps streaming weights meanwhile
(engine/costmodel.py models that, and that both read host memory). A prompt that sees no
earlier cache entry is the exception: its attention stays on the GPU and only its keys and
values go to the host without a host sync (see attend_host): by the copy engine straight into
a pinned cache (CacheDMA, models/host_transfer.py: a GPU's cache; int8 quantized on the
device first), else written by HostWriter's thread (a CPU device, or a cache that could not be
pinned).

The arithmetic is models.layers.attend's: the same cache writes, the same keys (a prefill over
an int8 cache attends over its own keys as computed), the same SDPA on the host's copy; on a
CPU-only machine the tokens equal the device tier's.
"""

from __future__ import annotations

import collections
import importlib
import logging
import os
from types import ModuleType
from typing import Any

import torch
from torch.profiler import record_function

from zeroinf.errors import ConfigError
from zeroinf.models.base import LayerKV
from zeroinf.models.host_transfer import cache_dma, to_host, writer
from zeroinf.models.layers import sdpa, step_keys, write_kv

log = logging.getLogger("zeroinf")

CHUNK_BYTES = 64 << 20  # temporaries of one chunk of (rows x kv heads)
NATIVE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # native/host_attn.c
NATIVE_INT8 = 3  # its code for an int8 cache (the cache's storage only)


def _load_native() -> ModuleType | None:
    try:
        return importlib.import_module("zeroinf._native_attn")
    except ImportError as e:
        log.warning("zeroinf: native host attention not built (%s): the host KV tier's decode "
                    "attention runs through torch's CPU SDPA, several times slower", e)  # fmt: skip
        return None


native = _load_native()


def attend_host(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv: LayerKV,
    start: int,
    mask: torch.Tensor,
    scale: float,
    fresh_keys: bool,
) -> torch.Tensor:
    """Write k, v at cache indices start .. start+S-1 of the host cache `kv` and attend over
    indices 0 .. start+S-1 on the CPU (a prompt that sees only its own keys: where q is).

    q [B, H, S, D]; k, v [B, Hkv, S, D] on the compute device; mask [B, 1, S, >= start + S]
    bool (True: may attend); fresh_keys: attend over this step's k, v as computed rather than
    as read back from the cache (an int8 prefill, models.layers.attend). Returns
    [B, S, H * D] on q's device, in q's dtype."""
    B, H, S, D = q.shape
    end = start + S
    if S > 1 and (fresh_keys or not kv.quantized) and _own_keys_only(mask, start):
        # A prompt that sees no earlier cache entry (at the cache's start, or a refill row,
        # whose predecessor's entries are masked) attends only over its own keys, which are on
        # the compute device already (and equal the cache's in the model's dtype): its S x S
        # attention runs there, on a GPU orders of magnitude faster than on the CPU; only the
        # keys go to the host, without a host sync, while the device goes on: by the copy
        # engine into a pinned cache, else through the writer thread (both waited for before
        # the cache is read).
        if kv.pinned:  # new_kv_cache pins a host cache for a CUDA device
            cache_dma.submit(kv, k, v, start)
        else:
            writer.submit(kv, k, v, start)
        o = sdpa(q, k, v, mask[..., start:end], scale)  # [B, H, S, D]
        return o.transpose(1, 2).reshape(B, S, H * D)
    # This layer's cache complete before it is read: the writer's writes (the host waits), the
    # copy engine's (this stream waits: what it runs from here on may read the cache).
    writer.flush()
    cuda = q.is_cuda
    if cuda:
        cache_dma.order(q.device)
    stream = torch.cuda.current_stream(q.device) if cuda else None
    with record_function("host_attn.to_host"):  # spans for the profiler (tools/profile_bench)
        hq, hk, hv, hmask = to_host(q, k, v, mask[..., :end], sync=False)
    out = torch.empty(B, S, H * D, dtype=q.dtype, pin_memory=cuda)
    fresh = (hk, hv) if fresh_keys else None
    with record_function("host_attn.attend"):
        # The native kernel writes k, v itself (no torch CPU op just before it: see its file);
        # on a GPU it is queued in the stream, after the copies, and this thread goes on.
        queued = native_decode(hq, kv, end, hmask, scale, out, fresh, new=(hk, hv), stream=stream)
        if not queued:
            if stream is not None:
                stream.synchronize()  # the copies to the host are done
            write_kv(kv, hk, hv, start)
            _attend_torch(hq, kv, end, hmask, scale, out, fresh)
    if not cuda:
        return out
    result = _to_device(out, q.device)
    if queued:
        in_flight.add(hq, hk, hv, hmask, out)
    return result


HOST_OUT_MODES = ("copy", "sm")


def _to_device(out: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The pinned attention output [B, S, H * D] on `device`, stream-ordered, read over PCIe by
    the GPU's cores (kernels.copy_from_pinned) rather than copied by the copy engine: a small
    copy on the engine waits behind the streamed unit the prefetcher is copying (~21 ms behind
    a 1.15 GiB unit, tools/bench_copy_contention.py), and each host layer sent one (OPT-30B,
    batch 96: the decode step 1.041 -> 0.909 s, docs/benchmarks.md). ZEROINF_HOST_OUT=copy
    brings back the engine's copy, for A/B measurements."""
    mode = os.environ.get("ZEROINF_HOST_OUT", "sm")
    if mode not in HOST_OUT_MODES:
        raise ConfigError(f"ZEROINF_HOST_OUT={mode!r}: use one of {', '.join(HOST_OUT_MODES)}")
    if mode == "copy":
        return out.to(device, non_blocking=True)
    from kernels import copy_from_pinned

    return copy_from_pinned(out, torch.empty(out.shape, dtype=out.dtype, device=device))


class InFlight:
    """Host attentions queued in CUDA streams (native_decode with a stream) whose buffers must
    outlive them: torch's pinned-memory cache would hand a freed staging buffer out again once
    its copy is done, before the host function has read it. Each entry holds its buffers and an
    event after the output's copy back; at most `depth` wait, which bounds how far this thread
    runs ahead of the device (and the staging memory)."""

    def __init__(self, depth: int = 4) -> None:
        self.depth = depth
        self.entries: collections.deque[tuple[Any, tuple[torch.Tensor, ...]]] = collections.deque()

    def add(self, *buffers: torch.Tensor) -> None:
        # blocking: a thread waiting on it sleeps. CUDA's default wait spins on a core (one
        # context, more cores than contexts), and this thread waits most of a decode step:
        # it would take one of the cores the kernel's threads run on.
        done = torch.cuda.Event(blocking=True)
        done.record()
        self.entries.append((done, buffers))
        while self.entries and (len(self.entries) > self.depth or self.entries[0][0].query()):
            self.entries.popleft()[0].synchronize()

    def wait(self) -> None:
        """Every queued host attention has run; an out-of-memory in one is raised here."""
        if self.entries:
            self.entries[-1][0].synchronize()
            self.entries.clear()
        failed = native.failures() if native is not None else 0  # type: ignore[attr-defined]
        if failed:
            raise MemoryError(f"host attention ran out of memory in {failed} queued layer(s)")


in_flight = InFlight()


def finish_host_work(raise_errors: bool = True) -> None:
    """Every prompt key and value submitted so far is in its host cache and every queued host
    attention has run (the executor calls it at the end of each pass, so that nothing of the
    host KV tier outlives a pass; raise_errors=False when the pass fails anyway)."""
    cache_dma.wait()  # first: the caller may free the caches even if what follows raises
    try:
        in_flight.wait()
    except MemoryError:
        if raise_errors:
            raise
    writer.flush(raise_errors)


def take_stats() -> dict[str, float]:
    """Since the last call (and reset): the native kernel's calls and wall seconds, the writer
    thread's seconds in write_kv and the bytes it wrote, and the bytes the copy engine was given
    to put into pinned caches (zeroinf-bench reports them)."""
    calls, seconds = native.stats() if native is not None else (0, 0.0)  # type: ignore[attr-defined]
    out = {"kernel_calls": calls, "kernel_s": seconds, "writer_s": writer.busy_s,
           "writer_bytes": writer.written_bytes, "dma_bytes": cache_dma.copied_bytes}  # fmt: skip
    writer.busy_s, writer.written_bytes, cache_dma.copied_bytes = 0.0, 0, 0
    return out


def _own_keys_only(mask: torch.Tensor, start: int) -> bool:
    """Whether no query may attend to a cache index before `start` (mask [B, 1, S, T])."""
    return start == 0 or not bool(mask[..., :start].any())  # one host sync


def attend_cached(
    q: torch.Tensor,
    kv: LayerKV,
    end: int,
    mask: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    fresh: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """out [B, S, H * D] = attention of host q [B, H, S, D] over cache indices 0 .. end-1 of
    the host cache, masked by mask [B, 1, S, end], in chunks of rows and kv heads. fresh: this
    step's k, v [B, Hkv, S, D] in place of the cache's last S indices (fresh_keys above)."""
    if not native_decode(q, kv, end, mask, scale, out, fresh):
        _attend_torch(q, kv, end, mask, scale, out, fresh)


def _attend_torch(
    q: torch.Tensor,
    kv: LayerKV,
    end: int,
    mask: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    fresh: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """attend_cached with torch's SDPA, in chunks (what native_decode does not take)."""
    B, H, S, D = q.shape
    Hkv = kv.k.shape[1]
    n_rep = H // Hkv
    rows, heads = chunk_shape(B, Hkv, n_rep, S, end, D, q.element_size(), fresh is not None,
                              kv.quantized)  # fmt: skip
    for r in range(0, B, rows):
        rs = slice(r, r + rows)
        for h in range(0, Hkv, heads):
            hs = slice(h, min(h + heads, Hkv))
            qs = slice(hs.start * n_rep, hs.stop * n_rep)  # the query heads of kv heads hs
            part = LayerKV(kv.k[rs, hs], kv.v[rs, hs],
                           None if kv.k_scale is None else kv.k_scale[rs, hs],
                           None if kv.v_scale is None else kv.v_scale[rs, hs])  # fmt: skip
            own = None if fresh is None else (fresh[0][rs, hs], fresh[1][rs, hs])
            keys, values = step_keys(part, end, q.dtype, own)  # [b, h, end, D] each
            o = sdpa(q[rs, qs], keys, values, mask[rs], scale)  # [b, h * n_rep, S, D]
            out[rs, :, qs.start * D : qs.stop * D] = o.transpose(1, 2).flatten(2)


def native_decode(
    q: torch.Tensor,
    kv: LayerKV,
    end: int,
    mask: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    fresh: tuple[torch.Tensor, torch.Tensor] | None = None,
    new: tuple[torch.Tensor, torch.Tensor] | None = None,
    portable: bool = False,
    ahead: int = 8,
    stream: torch.cuda.Stream | None = None,
) -> bool:
    """attend_cached through native/host_attn.c where it applies (one query token per row, a
    16-bit or float32 cache read as written or an int8 one with its scales, every tensor with
    its last dim contiguous; q, out, new and an unquantized cache of one dtype); False where it
    does not (nothing done, nothing written). new: this step's k, v [B, Hkv, 1, D], written at
    cache index end - 1 before the attention, in the same pass (quantized as write_kv would).
    A row with no visible position gets zeros (the step's own key is always visible in a
    decode step). portable: the kernel's plain-C path even where the CPU has AVX2
    (for tests); ahead: its software prefetch distance in rows.
    stream: queue the kernel in this CUDA stream instead of running it now (the buffers must
    then outlive it: InFlight)."""
    B, H, S, D = q.shape
    k, v = kv.k, kv.v
    Hkv = k.shape[1]
    code = NATIVE_DTYPES.get(q.dtype)
    tensors = (out,) + (new or ()) + (() if kv.quantized else (k, v))
    scales = (kv.k_scale, kv.v_scale) if kv.quantized else ()
    if (S != 1 or fresh is not None or code is None or native is None
            or not all(x.dtype == q.dtype and x.stride(-1) == 1 for x in tensors)
            or (kv.quantized and not (k.dtype == v.dtype == torch.int8 and k.stride(-1) == 1
                                      and v.stride(-1) == 1))
            or not all(x.dtype == torch.float32 and x.stride(-1) == 1 for x in scales)
            or q.stride(-1) != 1 or mask.dtype != torch.bool or mask.stride(-1) != 1
            or end > k.shape[2]
            or (new is not None and any(x.shape != (B, Hkv, 1, D) for x in new))):  # fmt: skip
        return False
    kn, vn = new or (k, v)  # (k, v): placeholders for the strides when nothing is written
    args = (
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), mask.data_ptr(),
        kn.data_ptr() if new else 0, vn.data_ptr() if new else 0,
        (B, H, Hkv, D, end),
        (q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0),
         v.stride(1), v.stride(2), out.stride(0), mask.stride(0), kn.stride(0), kn.stride(1),
         vn.stride(0), vn.stride(1)),
        code, scale, torch.get_num_threads(), portable, ahead,
    )  # fmt: skip
    if kv.quantized:
        ks, vs = scales
        args += (NATIVE_INT8, (ks.data_ptr(), vs.data_ptr(), ks.stride(0), ks.stride(1),
                               vs.stride(0), vs.stride(1)))  # fmt: skip
    if stream is None:
        native.decode(*args)  # type: ignore[attr-defined]
    else:
        native.decode_async(stream.cuda_stream, args)  # type: ignore[attr-defined]
    return True


def chunk_shape(
    B: int, Hkv: int, n_rep: int, S: int, T: int, D: int, itemsize: int, copies: bool = False,
    quantized: bool = False,
) -> tuple[int, int]:  # fmt: skip
    """(rows, kv heads) per chunk: the chunk's temporaries (pair_bytes) fit CHUNK_BYTES, at least
    one (row, kv head). A 16-bit multi-head cache needs no copy, so a decode step is then one
    SDPA call over every row (each call costs tens of microseconds of dispatch)."""
    per = pair_bytes(n_rep, S, T, D, itemsize, copies, quantized)
    heads = max(1, min(Hkv, CHUNK_BYTES // per))
    rows = max(1, CHUNK_BYTES // (per * heads)) if heads == Hkv else 1
    return rows, heads


def pair_bytes(
    n_rep: int, S: int, T: int, D: int, itemsize: int, copies: bool, quantized: bool
) -> int:
    """Temporary bytes of one (row, kv head): float32 scores [n_rep * S, T], and keys and values
    [T, D] copied in the compute dtype when `copies` (this step's own appended, or an int8
    cache dequantized, through float32), expanded n_rep times for GQA."""
    kv = 2 * T * D
    per = 4 * n_rep * S * T
    if quantized:
        per += kv * (4 + itemsize)
    if copies or quantized:
        per += kv * itemsize
    if n_rep > 1:
        per += kv * n_rep * itemsize
    return per
