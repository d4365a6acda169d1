"""Does splitting a streamed unit's H2D copy over several streams (copy engines) move it faster?

b96w's decode copies (OPT-13B layers, 629 MB each) run at a median of 54 GB/s but a tenth of
them at <= 42 (docs/benchmarks.md, the tenth session). The prefetcher issues each unit as one
cudaMemcpyAsync on one copy stream. This times the same bytes as: one copy on one stream; the
unit in pieces queued on one stream; the unit's pieces on 2 or 4 streams at once (the H100 has
several copy engines); and the GPU's cores reading the pinned unit (kernels.copy_from_pinned).
Sources are 8 distinct pinned units (as the CPU tier's units are distinct host memory, far
beyond the L3); variants are interleaved round by round so the machine's drift hits each alike.
Per variant: median, p10 and p90 of each unit's rate (from its first piece issued to its last
done). Prints a table last.

    PYTHONPATH=. python tools/bench_h2d_streams.py [--rounds 6 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import copy_from_pinned  # noqa: E402
from zeroinf.io import aligned_empty  # noqa: E402

UNIT = 629 << 20  # OPT-13B's layer: 12 x 5120^2 x 2 bytes (+ biases), rounded
SOURCES = 8


def pieces(t: torch.Tensor, n: int) -> list[torch.Tensor]:
    return list(t.chunk(n))


def timed_units(
    srcs: list[torch.Tensor], dst: torch.Tensor, streams: list[torch.cuda.Stream], n: int,
    cores: bool,
) -> list[float]:  # fmt: skip
    """Copy every source unit into dst in turn (each unit in n pieces, piece i on stream
    i % len(streams)); return each unit's bytes/s, from the gate before its first piece to the
    last piece done."""
    main = torch.cuda.current_stream()
    marks: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    torch.cuda.synchronize()
    for src in srcs:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(main)
        done = []
        for i, (s_piece, d_piece) in enumerate(zip(pieces(src, n), pieces(dst, n), strict=True)):
            st = streams[i % len(streams)]
            st.wait_event(start)
            with torch.cuda.stream(st):
                if cores:
                    copy_from_pinned(s_piece, d_piece)
                else:
                    d_piece.copy_(s_piece, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(st)
            done.append(ev)
        for ev in done:
            main.wait_event(ev)
        end.record(main)
        marks.append((start, end))
    torch.cuda.synchronize()
    return [UNIT / (a.elapsed_time(b) / 1e3) for a, b in marks]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    srcs = []
    for i in range(SOURCES):
        s = aligned_empty(UNIT, pin=True)[:UNIT]
        s.fill_(i)  # touched, so every page is resident before timing
        srcs.append(s)
    dst = torch.empty(UNIT, dtype=torch.uint8, device=dev)
    streams = [torch.cuda.Stream(dev) for _ in range(4)]
    variants: dict[str, Callable[[], list[float]]] = {
        "1 copy, 1 stream": lambda: timed_units(srcs, dst, streams[:1], 1, False),
        "4 pieces, 1 stream": lambda: timed_units(srcs, dst, streams[:1], 4, False),
        "16 pieces, 1 stream": lambda: timed_units(srcs, dst, streams[:1], 16, False),
        "2 pieces, 2 streams": lambda: timed_units(srcs, dst, streams[:2], 2, False),
        "8 pieces, 2 streams": lambda: timed_units(srcs, dst, streams[:2], 8, False),
        "4 pieces, 4 streams": lambda: timed_units(srcs, dst, streams[:4], 4, False),
        "GPU cores read it": lambda: timed_units(srcs, dst, streams[:1], 1, True),
    }
    for run in variants.values():  # warm-up: first-touch of the mappings, kernel compile
        run()
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, run in variants.items():
            rates[name] += run()
    rows = {}
    for name, r in rates.items():
        q = statistics.quantiles(r, n=10)
        rows[name] = {"p10": q[0] / 1e9, "p50": statistics.median(r) / 1e9, "p90": q[-1] / 1e9,
                      "mean_time_rate": len(r) * UNIT / sum(UNIT / x for x in r) / 1e9}  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    print(f"{'variant':<22} {'p10':>6} {'p50':>6} {'p90':>6} {'by time':>8}  (GB/s per unit)")
    for name, r in rows.items():
        print(f"{name:<22} {r['p10']:>6.1f} {r['p50']:>6.1f} {r['p90']:>6.1f} "
              f"{r['mean_time_rate']:>8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
