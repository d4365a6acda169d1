"""Does a small host-to-device copy wait behind a large one on another stream?

The host KV tier sends each layer's attention output (OPT-30B, batch 96: 1.4 MB) to the GPU on
the compute stream while the prefetcher's copy stream brings a 1.2 GB layer in, both H2D. If the
copy engine takes them in order, the small copy (and the layer's rest, and every layer after it)
waits for the rest of the large one: up to ~25 ms. A decode step spends 0.19-0.28 s outside its
host attention (docs/benchmarks.md, the fifth session), which this would explain. Measured here:
the latency of small H2D copies (pinned -> device, on their own stream, one at a time) alone,
beside one large copy per unit, and beside the same bytes in chunks of several sizes (queued at
once, as the prefetcher would); then the same small copy read by the GPU's cores
(kernels.copy_from_pinned, the host tier's way), alone and beside whole-unit copies.

    PYTHONPATH=. python tools/bench_copy_contention.py [--small-mib 1.4 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kernels import copy_from_pinned

GB = 1e9


def engine_copy(src: torch.Tensor, dst: torch.Tensor) -> None:
    dst.copy_(src, non_blocking=True)


Copy = Callable[[torch.Tensor, torch.Tensor], Any]


def small_copy_latencies(
    small: torch.Tensor, dst: torch.Tensor, stream: torch.cuda.Stream, n: int, gap_s: float,
    copy: Copy = engine_copy,
) -> list[float]:  # fmt: skip
    """Seconds from issue to completion of n small copies on `stream`, one at a time, `gap_s`
    apart (host clock: issue, then a blocking event's wait)."""
    out = []
    done = torch.cuda.Event(blocking=True)
    for _ in range(n):
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            copy(small, dst)
            done.record(stream)
        done.synchronize()
        out.append(time.perf_counter() - t0)
        time.sleep(gap_s)
    return out


def beside_large(
    small: torch.Tensor, sdst: torch.Tensor, big: torch.Tensor, bdst: torch.Tensor,
    chunk: int, n: int, gap_s: float, copy: Copy = engine_copy,
) -> tuple[list[float], float]:  # fmt: skip
    """(small copies' latencies, large copies' GB/s) with large copies (whole, or in `chunk`
    bytes each; 0: whole) looping on another stream from another thread."""
    copy_stream, small_stream = torch.cuda.Stream(), torch.cuda.Stream()
    stop = threading.Event()
    moved = [0, 0.0]
    done = torch.cuda.Event(blocking=True)

    def copier() -> None:
        t0 = time.perf_counter()
        with torch.cuda.stream(copy_stream):
            while not stop.is_set():
                step = chunk or big.numel()
                for a in range(0, big.numel(), step):
                    bdst[a : a + step].copy_(big[a : a + step], non_blocking=True)
                done.record(copy_stream)
                done.synchronize()
                moved[0] += big.numel()
        moved[1] = time.perf_counter() - t0

    th = threading.Thread(target=copier, daemon=True)
    th.start()
    time.sleep(0.2)
    try:
        lat = small_copy_latencies(small, sdst, small_stream, n, gap_s, copy)
    finally:
        stop.set()
        th.join()
    return lat, moved[0] / moved[1] / GB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small-mib", type=float, default=1.4)
    ap.add_argument("--unit-gib", type=float, default=1.15)
    ap.add_argument("--n", type=int, default=200, help="small copies per variant")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    small = torch.empty(int(a.small_mib * 2**20), dtype=torch.uint8, pin_memory=True)
    sdst = torch.empty_like(small, device="cuda")
    big = torch.empty(int(a.unit_gib * 2**30), dtype=torch.uint8, pin_memory=True)
    bdst = torch.empty_like(big, device="cuda")
    gap = 0.002  # a host attention's output every ~20 ms; denser here for more samples
    rows = []
    lat = small_copy_latencies(small, sdst, torch.cuda.Stream(), a.n, gap)
    rows.append(("alone", lat, float("nan")))
    for chunk_mib in (0, 256, 64, 16):
        lat, rate = beside_large(small, sdst, big, bdst, chunk_mib << 20, a.n, gap)
        name = "beside whole-unit copies" if not chunk_mib else f"beside {chunk_mib} MiB chunks"
        rows.append((name, lat, rate))
        print(f"{name}: done", flush=True)
    # the host tier's way (models/host_attention.py): the GPU's cores read the pinned bytes
    rows.append(("by the GPU's cores, alone",
                 small_copy_latencies(small, sdst, torch.cuda.Stream(), a.n, gap, copy_from_pinned),
                 float("nan")))  # fmt: skip
    lat, rate = beside_large(small, sdst, big, bdst, 0, a.n, gap, copy_from_pinned)
    rows.append(("by the GPU's cores, beside whole-unit copies", lat, rate))
    table = []
    print(f"\nsmall copy {a.small_mib} MiB, unit {a.unit_gib} GiB, {a.n} small copies each")
    print("| small H2D copy | median ms | p90 ms | max ms | large copies GB/s |")
    print("|---|---|---|---|---|")
    for name, lat, rate in rows:
        ms = sorted(x * 1e3 for x in lat)
        fig = (statistics.median(ms), ms[int(0.9 * len(ms))], ms[-1], rate)
        table.append((name, *fig))
        print(f"| {name} | {fig[0]:.2f} | {fig[1]:.2f} | {fig[2]:.2f} | {fig[3]:.1f} |")
    if a.json:
        a.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
