"""Which reader times host memory: torch's sum over the same 4 GiB holding different values,
read as float32 and as int64 words, alone and beside pinned H2D copies (GB/s of the CPU's
reads; H2D GB/s beside them). The probe's host memory term (engine/probe.host_reader) sums
int64 words; this says whether a float sum's rate depends on the values on this machine (a
16-bit cache read as float32 words), and whether the two readers agree on plain memory.

    python tools/bench_host_read.py [--gib 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # its sibling, run as a script
from bench_host_attention import alone_and_beside  # noqa: E402  (also puts the checkout first)

from zeroinf.io import aligned_empty  # noqa: E402

GB = 1e9


def buffers(nbytes: int) -> dict[str, torch.Tensor]:
    """Host buffers of `nbytes` (huge pages, as the host cache is mapped), by what they hold."""

    def fp16(scale: float) -> torch.Tensor:
        x = aligned_empty(nbytes).view(torch.float16)
        for part in x.split(1 << 26):  # in pieces: a float32 randn of 4 GiB would need 8 more
            part.copy_(torch.randn(part.shape) * scale)
        return x

    ones = aligned_empty(nbytes).view(torch.float32).fill_(1.0)
    return {
        "ones": ones,
        "fp16 N(0, 1)": fp16(1.0),
        "fp16 N(0, 0.03), a synthetic run's keys": fp16(0.03),
        "fp16 N(0, 1e-6), subnormals as fp16": fp16(1e-6),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=4.0)
    p.add_argument("--json")
    a = p.parse_args()
    nbytes = int(a.gib * (1 << 30)) // 64 * 64
    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    rows = []
    for name, buf in buffers(nbytes).items():
        for as_ in (torch.float32, torch.int64):
            x = buf.view(torch.uint8).view(as_)
            rates = alone_and_beside(lambda x=x: x.sum(), nbytes, cuda)  # GB/s; NaN: no CUDA
            rows.append((f"{name}, read as {str(as_).removeprefix('torch.')}", *rates))
            print(rows[-1], flush=True)
    if cuda is not None:  # what pinning a host cache in place would cost (GB/s registered)
        x = aligned_empty(nbytes)
        x.fill_(1)
        rt = torch.cuda.cudart()
        t = time.perf_counter()
        assert rt.cudaHostRegister(x.data_ptr(), nbytes, 0) == 0
        reg = time.perf_counter() - t
        t = time.perf_counter()
        assert rt.cudaHostUnregister(x.data_ptr()) == 0
        unreg = time.perf_counter() - t
        print(
            f"cudaHostRegister of {nbytes / GB:.1f} GB (huge pages): {reg:.3f} s "
            f"({nbytes / reg / GB:.1f} GB/s), unregister {unreg:.3f} s"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"\n{'reader over ' + str(a.gib) + ' GiB':58} {'alone':>7} {'+H2D':>7} {'H2D':>7}")
    for name, alone, beside, h2d in rows:
        fmt = lambda v: f"{v:7.1f}" if not math.isnan(v) else "      -"  # noqa: E731
        print(f"{name:58} {fmt(alone)} {fmt(beside)} {fmt(h2d)}")


if __name__ == "__main__":
    main()
