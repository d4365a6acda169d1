"""Does the GPU's own work slow the streamed weights' host-to-device copies?

b96w's decode copies ran at 49.9 GB/s while copying against the probe's 53.4 (run 54,
docs/benchmarks.md), with the link idle only 1.4 ms a step: the step's gap to its transfer
floor is the copy rate itself. b32, whose decode does a third of the device work per step,
copies at the probe's rate. Here: one streamed unit's bytes (600 MiB, OPT-13B's layer) copied
pinned -> device on a side stream, 8 in a row, alone and beside each of these on the compute
stream, queued to outlast the copies:
  decode attn   kernels.decode_attention over b96w's per-layer cache (3 x 32 rows, 40 heads,
                544 positions: 3 x 178 MB of keys and values), the device tier's decode
  decode gemm   [32, 5120] x [5120, 20480]: a micro-batch's fc1, bound by reading the weight
  hbm copy      a device-to-device copy of 1 GiB (HBM read and write at full rate)
  prefill gemm  [8192, 5120] x [5120, 20480]: bound by the tensor cores
Each row: the copies' GB/s (median of 5 rounds) and the load's own rate beside them.

    python tools/bench_h2d_beside_kernels.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from zeroinf.io import aligned_empty  # noqa: E402

UNIT = 600 << 20
COPIES = 8


def copies_beside(
    src: torch.Tensor, dst: torch.Tensor, side: torch.cuda.Stream, load: Callable[[], None] | None,
    load_calls: int,
) -> tuple[float, float]:  # fmt: skip
    """(H2D bytes/s of COPIES unit copies, seconds per load call) with `load` (a graph's
    replay) queued `load_calls` times on the current stream at the same moment (None: the
    copies alone)."""
    torch.cuda.synchronize()
    gate = torch.cuda.Event()
    gate.record()  # both streams start from here
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    c, d = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    side.wait_event(gate)
    with torch.cuda.stream(side):
        a.record(side)
        for _ in range(COPIES):
            dst.copy_(src, non_blocking=True)
        b.record(side)
    c.record()
    for _ in range(load_calls if load else 0):
        load()
    d.record()
    torch.cuda.synchronize()
    per_call = c.elapsed_time(d) / 1e3 / load_calls if load else 0.0
    return COPIES * UNIT / (a.elapsed_time(b) / 1e3), per_call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    a = ap.parse_args()
    dev, dt = torch.device("cuda", 0), torch.float16
    torch.cuda.set_device(dev)
    src = aligned_empty(UNIT, pin=True)[:UNIT]
    dst = torch.empty(UNIT, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream(dev)
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dt, generator=g) * 0.02

    B, H, T, D = 32, 40, 544, 128
    q = [rand(B, H, 1, D) for _ in range(3)]
    kv = [(rand(B, H, T, D), rand(B, H, T, D)) for _ in range(3)]
    x32, w = rand(32, 5120), rand(20480, 5120)
    x8k = rand(8192, 5120)
    big = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    big2 = torch.empty_like(big)
    loads: dict[str, tuple[Callable[[], None], float]] = {  # name: (call, bytes or flops a call)
        "decode attn": (lambda: [kernels.decode_attention(q[i], *kv[i], T) for i in range(3)],
                        3 * 2 * B * H * T * D * 2),
        "decode gemm": (lambda: F.linear(x32, w), w.numel() * 2),
        "hbm copy": (lambda: big2.copy_(big), 2 * big.numel()),
        "prefill gemm": (lambda: F.linear(x8k, w), 2 * 8192 * 5120 * 20480),
    }  # fmt: skip
    rows: dict[str, dict[str, float]] = {}
    alone = [copies_beside(src, dst, side, None, 0)[0] for _ in range(5)]
    rows["alone"] = {"h2d_GBps": statistics.median(alone) / 1e9}
    window = COPIES * UNIT / rows["alone"]["h2d_GBps"] / 1e9  # seconds the copies take
    for name, (call, work) in loads.items():
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()  # 20 calls a replay: no host launch gaps in the load
        with torch.cuda.graph(graph):
            for _ in range(20):
                call()
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(5):
            graph.replay()
        t1.record()
        torch.cuda.synchronize()
        per_replay = t0.elapsed_time(t1) / 1e3 / 5
        replays = max(1, int(1.5 * window / per_replay))  # outlast the copies
        res = [copies_beside(src, dst, side, graph.replay, replays) for _ in range(5)]
        h2d = statistics.median(r[0] for r in res)
        beside = statistics.median(r[1] for r in res)
        unit, scale = ("TFLOP/s", 1e12) if "prefill" in name else ("GB/s", 1e9)
        rows[name] = {"h2d_GBps": h2d / 1e9, f"alone_{unit}": 20 * work / per_replay / scale,
                      f"beside_{unit}": 20 * work / beside / scale}  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"{'load':<14} {'H2D GB/s':>9} {'load alone':>14} {'load beside':>14}")
    for name, r in rows.items():
        vals = [v for k, v in r.items() if k != "h2d_GBps"]
        extra = "".join(f" {v:>14.1f}" for v in vals)
        print(f"{name:<14} {r['h2d_GBps']:>9.1f}{extra}")


if __name__ == "__main__":
    main()
