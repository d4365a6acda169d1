"""CUDA graphs for decode passes.

A decode pass issues ~10-20 kernels per unit; on the H100 machine Triton's launcher alone takes
80-190 us per int4 matmul, so the host needed 0.27 s to issue a pass that the GPU finishes in
0.29 s, and the copy engine idled whenever the host fell behind. Here each unit's computation
for one micro-batch is captured once, as a CUDA graph, and every later step replays it: one
launch per unit and micro-batch.

What makes a replay valid: every tensor the captured kernels touch keeps its address and
shape from step to step.
- weights: the unit's device buffer (a resident unit, or one of the streaming slots; a streamed
  unit may land in a different slot next pass, so graphs are keyed by the buffer's address);
- activations: unit j reads a static buffer and copies its result into the other one of a
  pair (per micro-batch, shape and dtype), which unit j + 1 reads;
- the step's context: the whole-cache form (models.base.Context.write_index), whose tensors
  and per-step memo the caller refreshes in place before every pass (refresh_context);
- the KV cache: kept, like this object, for as long as calls keep its shape
  (engine/generate.py DecodeState).
The waits that order a unit after its copy (prefetcher.acquire) and the slot's release after
the compute are recorded on the current stream around each replay, as for eager compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zeroinf.models.base import Context


class DecodeGraphs:
    """Captured unit computations of the decode passes of one shape (batch, cache length,
    micro-batch rows)."""

    def __init__(self, capture_stream: torch.cuda.Stream) -> None:
        self.stream = capture_stream
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool: replays never overlap
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._outs: dict[tuple[Any, ...], torch.Tensor] = {}
        self.captured = 0
        self.replayed = 0

    def run(
        self, j: int, buf: torch.Tensor, k: int, fn: Callable[[torch.Tensor], torch.Tensor],
        x: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """Unit j (weights in `buf`) on micro-batch k's static input x -> a static output.
        The first time: run eagerly (this step's result, and the warm-up that compiles and
        initialises what the kernels need), then capture for the steps that follow."""
        key = (j, buf.data_ptr(), k)
        hit = self.graphs.get(key)
        if hit is not None:
            hit[0].replay()
            self.replayed += 1
            return hit[1]
        y = fn(x)
        out = self._out(k, j % 2, y)
        out.copy_(y)
        del y
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            # thread_local: the prefetcher's worker thread (NVMe reads) keeps issuing copies
            # and waiting on events while this thread captures
            graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                out.copy_(fn(x))
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(self.stream)
        self.graphs[key] = (graph, out)
        self.captured += 1
        return out

    def _out(self, k: int, parity: int, like: torch.Tensor) -> torch.Tensor:
        key = (k, parity, tuple(like.shape), like.dtype)
        out = self._outs.get(key)
        if out is None:
            out = self._outs[key] = torch.empty_like(like)
        return out

    def close(self) -> None:
        self.graphs.clear()
        self._outs.clear()


def refresh_context(static: Context, fresh: Context) -> None:
    """Copy this step's context into the static one that the graphs captured (same shapes):
    positions, mask, write indices and every memo entry (tensors or tuples of tensors)."""
    static.positions.copy_(fresh.positions)
    static.mask.copy_(fresh.mask)
    assert static.write_index is not None and fresh.write_index is not None
    static.write_index.copy_(fresh.write_index)
    static.start = fresh.start
    for key, value in fresh.memo.items():
        old = static.memo.get(key)
        if old is None:
            static.memo[key] = value
        elif isinstance(value, tuple):
            for o, v in zip(old, value, strict=True):
                o.copy_(v)
        else:
            old.copy_(value)
