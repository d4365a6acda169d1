"""H2D copy bandwidth by host-buffer kind and size, on the GPU machine.

Which pinned memory moves fastest: torch's pin_memory (cudaHostAlloc), or an mmap registered with
cudaHostRegister (zeroinf.io.aligned_empty), with and without transparent huge pages; one copy
per size, and a 600 MB copy split into chunks. Prints a table last.

    python tools/probe_h2d.py
"""

from __future__ import annotations

import ctypes
import mmap
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zeroinf.io import aligned_empty  # noqa: E402

MB = 1 << 20


def registered(nbytes: int, huge: bool) -> torch.Tensor:
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        m.madvise(mmap.MADV_HUGEPAGE)
    t = torch.frombuffer(m, dtype=torch.uint8)
    t.fill_(1)  # fault the pages in before registering
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    err = int(torch.cuda.cudart().cudaHostRegister(addr, nbytes, 1))
    assert err == 0, err
    t._keep = m  # type: ignore[attr-defined]
    return t


def bandwidth(src: torch.Tensor, dst: torch.Tensor, chunks: int = 1, repeat: int = 7) -> float:
    n = src.numel()
    step = n // chunks
    times = []
    for _ in range(repeat + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for c in range(chunks):
            dst[c * step : (c + 1) * step].copy_(src[c * step : (c + 1) * step], non_blocking=True)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return n / statistics.median(times[1:]) / 1e9


def main() -> None:
    sizes = [64 * MB, 256 * MB, 600 * MB, 1024 * MB]
    big = max(sizes)
    kinds = {
        "torch pin_memory": lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1),
        "zeroinf aligned_empty": lambda n: aligned_empty(n, pin=True).fill_(1),
        "mmap+register": lambda n: registered(n, huge=False),
        "mmap+THP+register": lambda n: registered(n, huge=True),
    }
    dst = torch.empty(big, dtype=torch.uint8, device="cuda")
    rows, keep = [], []  # keep every buffer: a freed registration would be found again
    for name, make in kinds.items():
        src = make(big)
        row = [name] + [f"{bandwidth(src[:n], dst[:n]):6.1f}" for n in sizes]
        row.append(f"{bandwidth(src[: 600 * MB], dst[: 600 * MB], chunks=8):6.1f}")
        rows.append(row)
        keep.append(src)
    head = ["host buffer"] + [f"{n // MB}MB" for n in sizes] + ["600MB/8"]
    print(torch.cuda.get_device_name(), "H2D GB/s (median of 7)")
    print(" | ".join(f"{h:>22}" if i == 0 else f"{h:>7}" for i, h in enumerate(head)))
    for r in rows:
        print(" | ".join(f"{c:>22}" if i == 0 else f"{c:>7}" for i, c in enumerate(r)))


if __name__ == "__main__":
    main()
