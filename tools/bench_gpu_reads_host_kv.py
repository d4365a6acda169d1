"""Can the GPU take some rows of the host KV tier's decode attention, reading the pinned cache
over PCIe itself (zero-copy), while the CPU kernel takes the rest? A feasibility measurement.

    python tools/bench_gpu_reads_host_kv.py [--batch 96 --heads 56 --ctx 544 --head-dim 128]

The host tier's decode step is bound by the CPU kernel's reads of the cache on the processes
whose cache reads slowly (67-75 GB/s, docs/benchmarks.md), while the link, busy with 37.7 GB of
weights, has slack. Pinned memory is mapped into the GPU's address space, so the Triton decode
kernel (kernels.attention) can read the cache of rows [B - g, B) straight from host memory while
the native kernel attends rows [0, B - g) on the CPU. Measured here, at one layer's shape:
  gpu g rows      the Triton kernel over g rows of the pinned cache, alone (GB/s of cache read)
  cpu r rows      the native kernel over r rows, alone
  ... + H2D       the same with pinned H2D copies looping on a side stream (weights streaming)
  split           both at once: GPU rows launched first, the CPU rows on this thread, + H2D
Per-layer times and rates; a table comes last. Needs a CUDA GPU and the native module.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_host_attention import decode_shape_args  # noqa: E402

from kernels.attention import decode_attention  # noqa: E402
from zeroinf.engine.probe import concurrent_with_h2d, random_host_cache, seconds  # noqa: E402
from zeroinf.models.host_attention import native_decode  # noqa: E402

GB = 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    decode_shape_args(ap)
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.float16
    B, H, T, D = a.batch, a.heads, a.ctx, a.head_dim
    kv = random_host_cache(B, H, T, D, dt, device=dev)  # pinned, as a run's cache
    print(f"cache [{B}, {H}, {T}, {D}] fp16, pinned: {kv.pinned}, {2 * kv.k.nbytes / GB:.2f} GB")
    row_bytes = 2 * kv.k[0].nbytes  # one row's keys and values
    q_dev = torch.randn(B, H, 1, D, device=dev, dtype=dt)
    q_host = q_dev.cpu().pin_memory()
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool).pin_memory()
    out = torch.empty(B, 1, H * D, dtype=dt).pin_memory()
    scale = D**-0.5

    def gpu(g: int) -> Callable[[], None]:
        return lambda: decode_attention(
            q_dev[B - g :], kv.k[B - g :], kv.v[B - g :], T, scale=scale
        )

    def cpu(r: int) -> Callable[[], None]:
        part = kv.rows(0, r)
        return lambda: native_decode(q_host[:r], part, T, mask[:r], scale, out[:r])

    def synced(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            fn()
            torch.cuda.synchronize(dev)

        return run

    def split(g: int) -> Callable[[], None]:
        on_gpu, on_cpu = gpu(g), cpu(B - g)
        return synced(lambda: (on_gpu(), on_cpu()))  # GPU rows launched, CPU rows meanwhile

    # the GPU kernel against a device copy of its rows: the same reads from HBM (sanity)
    ref = decode_attention(q_dev[-16:], kv.k[-16:].to(dev), kv.v[-16:].to(dev), T, scale=scale)
    err = (gpu(16)().float() - ref.float()).abs().max().item()
    print(f"GPU kernel over the pinned cache vs over a device copy: max |diff| {err:.2e}")
    rows: list[tuple[str, float, float, float | None]] = []  # name, s per layer, GB/s, H2D GB/s
    cpu_s = seconds(cpu(B), torch.device("cpu"), 5)
    rows.append((f"cpu {B} rows", cpu_s, B * row_bytes / cpu_s / GB, None))
    for g in (8, 16, 24, 32, 48, B):
        t = seconds(gpu(g), dev, 5)
        rows.append((f"gpu {g} rows", t, g * row_bytes / t / GB, None))
    h2d, rate = concurrent_with_h2d(cpu(B), dev, 3.0)
    rows.append((f"cpu {B} rows + H2D", 1 / rate, B * row_bytes * rate / GB, h2d / GB))
    for g in (16, 32):
        h2d, rate = concurrent_with_h2d(synced(gpu(g)), dev, 3.0)
        rows.append((f"gpu {g} rows + H2D", 1 / rate, g * row_bytes * rate / GB, h2d / GB))
    for g in (0, 8, 16, 24, 32):
        h2d, rate = concurrent_with_h2d(split(g) if g else cpu(B), dev, 3.0)
        rows.append((f"split: cpu {B - g} + gpu {g} + H2D", 1 / rate, B * row_bytes * rate / GB,
                     h2d / GB))  # fmt: skip
    print(f"\n{'case':<34} {'ms/layer':>9} {'cache GB/s':>11} {'H2D GB/s':>9}")
    for name, t, gbs, h in rows:
        print(f"{name:<34} {t * 1e3:9.2f} {gbs:11.1f} {h if h is not None else float('nan'):9.1f}")
    if a.json:
        keys = ("case", "s_per_layer", "cache_GBps", "h2d_GBps")
        a.json.write_text(json.dumps([dict(zip(keys, r, strict=True)) for r in rows]))


if __name__ == "__main__":
    main()
