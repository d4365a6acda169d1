"""Moving the host KV tier's tensors between the device and host memory (models/host_attention.py
uses them): to_host's pinned staging copies, and HostWriter, which puts a prompt's keys and
values into a host cache off the calling thread.

The host KV tier, not the prefetcher, owns this side stream, its events and this staging: they
serve a KV cache whose use ends with each pass, not the units' weights the prefetcher streams
and keeps slots for.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import torch

from zeroinf.models.base import LayerKV
from zeroinf.models.layers import write_kv


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
            side = self.streams.setdefault(k.device, torch.cuda.Stream(k.device))
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
