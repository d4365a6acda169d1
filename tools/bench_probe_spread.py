"""How far the probe's CPU attention figures move between measurements on one machine.

The planner chooses between the "cpu" and "split" KV tiers on the probe's kernel rate beside
H2D. On one machine two probes a few minutes apart read 69.7 and 79.1 GB/s (runs 85, 2026-11-25,
docs/benchmarks.md), and inside the runs the kernel read up to 1.36 x the probe's figure. This
tool repeats the probe's own measurements (engine/probe.py: the kernel over its 4 GiB of 1 GiB
caches alone, the median of 5 calls; beside pinned H2D, the best of three windows) --repeat
times, with the probe's windows (1 s in all) and longer ones (3 s), and prints each figure's
min / median / max, and the huge-page share of a cache built as the probe builds its caches.

    python tools/bench_probe_spread.py [--repeat 5] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zeroinf.engine.probe import (  # noqa: E402
    _attention_beside_h2d,
    _cpu_attention,
    random_host_cache,
    seconds,
)
from zeroinf.io.memory import huge_page_share  # noqa: E402

GB = 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    nbytes, run = _cpu_attention(torch.float16, large=cuda is not None)
    kv = random_host_cache(128, 32, 512, 128, torch.float16)  # the probe's cache, built alike
    share = huge_page_share([kv.k, kv.v])
    del kv
    figures: dict[str, list[float]] = {"alone": []}
    for _ in range(a.repeat):
        figures["alone"].append(nbytes / seconds(run, torch.device("cpu"), repeat=5) / GB)
        if cuda is None:
            continue
        for total in (1.0, 3.0):  # the probe's 1 s (three windows of 1/3 s), and 3 s
            attn, h2d = _attention_beside_h2d(nbytes, run, cuda, total)
            figures.setdefault(f"beside H2D, {total:g} s", []).append(attn / GB)
            figures.setdefault(f"H2D beside it, {total:g} s", []).append(h2d / GB)
        print({k: round(v[-1], 1) for k, v in figures.items()}, flush=True)
    print(f"\nthe probe's cache: {nbytes / GB:.2f} GB a call, huge-page share {share}")
    print("| figure (GB/s) | min | median | max |")
    print("|---|---|---|---|")
    for name, xs in figures.items():
        print(f"| {name} | {min(xs):.1f} | {statistics.median(xs):.1f} | {max(xs):.1f} |")
    if a.json:
        a.json.write_text(json.dumps({"huge_page_share": share, **figures}, indent=1))


if __name__ == "__main__":
    main()
