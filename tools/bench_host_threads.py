"""Who holds the CPU while the host KV tier's kernel runs beside H2D copies.

Inside p30 runs the kernel reads the cache at about the probe's "beside H2D" rate, and the link
beside it drops to 38-42 GB/s; bench_host_attention's queued_vs_direct found the kernel queued
in a CUDA stream (as the tier runs it) ~10% slower in total (kernel + H2D) than called
directly. This tool measures, over 4 layers' pinned caches at OPT-30B's batch-96 decode shape,
the kernel called directly and queued, at several thread counts, beside pinned H2D copies:
kernel GB/s, H2D GB/s, their total, the CPU cores the process used, and the busiest threads
that outlive a call (main, the copier, the CUDA driver's threads: a thread spinning on a core
takes it from the kernel's). torch's sum over the same memory is the host memory probe's
reader, for its share of the total.

    python tools/bench_host_threads.py [--blocking-sync] [--json F]

--blocking-sync sets the device's primary context to block instead of spinning in the
driver's own waits (CU_CTX_SCHED_BLOCKING_SYNC) before CUDA starts.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_host_attention import direct_and_queued  # noqa: E402

from zeroinf.engine.probe import concurrent_with_h2d, random_host_cache  # noqa: E402

GB = 1e9
TICK = os.sysconf("SC_CLK_TCK")


def blocking_sync() -> None:
    """The primary context of device 0 blocks in the driver's waits (before it is created)."""
    cu = ctypes.CDLL("libcuda.so.1")
    dev = ctypes.c_int()
    assert cu.cuInit(0) == 0 and cu.cuDeviceGet(ctypes.byref(dev), 0) == 0
    setter = getattr(cu, "cuDevicePrimaryCtxSetFlags_v2", None) or cu.cuDevicePrimaryCtxSetFlags
    rc = setter(dev, 4)  # CU_CTX_SCHED_BLOCKING_SYNC
    assert rc == 0, f"cuDevicePrimaryCtxSetFlags: {rc}"


def thread_ticks() -> dict[int, tuple[str, int]]:
    """tid -> (name, user + system clock ticks) of this process's live threads."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            base = Path(f"/proc/self/task/{tid}")
            name = (base / "comm").read_text().strip()
            fields = (base / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(tid)] = (name, int(fields[11]) + int(fields[12]))
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile
    return out


def beside_h2d(run: Callable[[], None], nbytes: int, cuda: torch.device) -> dict:
    """`run` (reading `nbytes`) again and again beside pinned H2D copies for 2 s: its GB/s, the
    copies' GB/s, the cores the process used, and the busiest threads that lived throughout."""
    time.sleep(0.1)  # torch's OpenMP threads quiet
    before, cpu0, t0 = thread_ticks(), time.process_time(), time.perf_counter()
    copied, calls = concurrent_with_h2d(run, cuda, 2.0)
    after, cpu1, wall = thread_ticks(), time.process_time(), time.perf_counter() - t0
    busy = sorted(((after[t][1] - before[t][1]) / TICK / wall, f"{after[t][0]}:{t}")
                  for t in before.keys() & after.keys())[::-1][:4]  # fmt: skip
    return {"GBps": calls * nbytes / GB, "h2d_GBps": copied / GB,
            "cores": (cpu1 - cpu0) / wall,
            "busiest": [f"{name} {cores:.2f}" for cores, name in busy]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocking-sync", action="store_true")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.blocking_sync:
        blocking_sync()
    cuda = torch.device("cuda")
    torch.cuda.init()
    b, h, t, d = 96, 56, 544, 128  # OPT-30B's decode layer at batch 96, 512 + 32 positions
    first = random_host_cache(b, h, t, d, torch.float16, device=cuda)
    kvs = [first] + [random_host_cache(b, h, t, d, torch.float16, like=first, device=cuda)
                     for _ in range(a.layers - 1)]  # fmt: skip
    nbytes = sum(kv.k.nbytes + kv.v.nbytes for kv in kvs)
    direct, queued = direct_and_queued(kvs, b, h, t, d, cuda)
    flat = [x.view(-1).view(torch.float32) for kv in kvs for x in (kv.k, kv.v)]

    def total() -> None:
        for x in flat:
            x.sum()

    cores = torch.get_num_threads()
    rows = []
    variants = [("torch sum", total, cores)]
    variants += [(mode, fn, n) for n in (cores, cores - 1, cores - 2, cores - 4)
                 for mode, fn in (("direct", direct), ("queued", queued))]  # fmt: skip
    for mode, fn, n in variants:
        torch.set_num_threads(n)
        row = {"mode": mode, "threads": n, **beside_h2d(fn, nbytes, cuda)}
        torch.set_num_threads(cores)
        rows.append(row)
        print(row, flush=True)
    sync = "blocking sync" if a.blocking_sync else "default (spin)"
    print(f"\n{nbytes / GB:.1f} GB of cache, {sync}")
    print("| reader | threads | reader GB/s | H2D GB/s | total | process cores | busiest threads |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['threads']} | {r['GBps']:.1f} | {r['h2d_GBps']:.1f} | "
              f"{r['GBps'] + r['h2d_GBps']:.1f} | {r['cores']:.2f} | "
              f"{', '.join(r['busiest'])} |")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps({"blocking_sync": a.blocking_sync, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
