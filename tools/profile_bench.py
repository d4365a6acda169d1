"""Where a zeroinf-bench run spends GPU time: the same arguments as zeroinf-bench, run under the
torch profiler (CUDA activity only, so the host-side cost of profiling stays small), then the
kernels that took the most GPU time, as a table; with --cpu, host-side time by op and span.

    python tools/profile_bench.py [--top 30] [--cpu] [--trace out.json] -- <zeroinf-bench args>

Use a short --gen-len to look at the prefill, a long one for decode. Timings under the
profiler are not benchmark figures (the profiler adds overhead); the shares are what it is for.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from zeroinf.cli.bench import main as bench_main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, bench_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv \
        else (argv, [])  # fmt: skip
    p = argparse.ArgumentParser(prog="profile_bench", description=__doc__)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--trace", help="also write a Chrome trace here")
    p.add_argument("--cpu", action="store_true", help="host-side time (spans: host_attn.*)")
    a = p.parse_args(ours)
    cuda = torch.cuda.is_available() and not a.cpu
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        rc = bench_main(bench_args)
    key = "cuda_time_total" if cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=a.top)
    print(table, flush=True)
    if a.trace:
        prof.export_chrome_trace(a.trace)
    return rc or 0


if __name__ == "__main__":
    raise SystemExit(main())
