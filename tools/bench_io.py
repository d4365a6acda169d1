"""Storage bandwidth in one run, against the raw device:

  1. dd if=FILE of=/dev/null iflag=direct bs=8M over the file set (the baseline; run first and
     last, the better of the two counts, so a warming disk cannot flatter the readers),
  2. every reader backend at a few queue depths and block sizes, reading the file set the way
     the executor does (unit-sized requests, `--inflight` of them in flight),
  3. where CUDA exists: pinned -> GPU copy bandwidth, the page-locking rate of PinnedArena
     (1 thread vs 8), and NVMe -> pinned staging ring -> GPU end to end (copies on a side
     stream overlapping the next reads), with the best native configuration found in 2.

The page cache is dropped before every variant where allowed (root). Prints a table last and
writes JSON (--json). A full run reads the file set ~20 times: ~2 minutes at 1 GB/s for 4 GB.

    python tools/bench_io.py --dir /mnt/nvme/zeroinf-bench --json bench_io.json
    python tools/bench_io.py --dir /tmp/b --size-gb 0.5 --queue-depths 32 --block-sizes 1MiB
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from zeroinf.errors import ConfigError  # noqa: E402
from zeroinf.io import BACKENDS, PinnedArena, aligned_empty, open_reader  # noqa: E402
from zeroinf.sizes import align_up, parse_bytes  # noqa: E402

GB = 1e9
Plan = list[tuple[Path, int, int]]  # (file, offset, nbytes) per request


def drop_caches() -> str | None:
    """Drop the page cache; returns None, or why it could not."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        return f"{e.strerror} (needs root)"
    return None


def make_files(folder: Path, total: int, count: int) -> list[Path]:
    """The file set: `count` files of random bytes, reused when already there."""
    folder.mkdir(parents=True, exist_ok=True)
    each = align_up(total // count, 1 << 20)
    chunk = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8).numpy().tobytes()
    files = []
    for i in range(count):
        path = folder / f"zeroinf-bench-{i}.bin"
        if not path.exists() or path.stat().st_size != each:
            print(f"writing {path} ({each / GB:.2f} GB)", flush=True)
            with open(path, "wb") as f:
                for pos in range(0, each, len(chunk)):
                    f.write(chunk[: min(len(chunk), each - pos)])
                f.flush()
                os.fsync(f.fileno())
        files.append(path)
    return files


def read_plan(files: list[Path], nbytes: int, request: int, start: int) -> Plan:
    """Sequential requests over the files, wrapping around, from the start-th request."""
    every = [
        (p, off, min(request, p.stat().st_size - off))
        for p in files
        for off in range(0, p.stat().st_size, request)
    ]
    plan, total, i = [], 0, start
    while total < nbytes:
        plan.append(every[i % len(every)])
        total += plan[-1][2]
        i += 1
    return plan


def run_dd(files: list[Path], nbytes: int) -> dict[str, Any]:
    """dd's own timings (process start-up excluded), summed over the files it read."""
    done, secs = 0, 0.0
    for path in files:
        if done >= nbytes:
            break
        count = max(1, min(path.stat().st_size, nbytes - done) // (8 << 20))
        out = subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", "iflag=direct", "bs=8M", f"count={count}"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        m = re.search(r"(\d+) bytes .* copied, ([0-9.eE+-]+) s", out)
        if not m:
            raise RuntimeError(f"cannot parse dd output: {out!r}")
        done += int(m.group(1))
        secs += float(m.group(2))
    return {"bytes": done, "seconds": secs, "gbps": done / secs / GB}


def run_reader(
    backend: str, qd: int, bs: int, plan: Plan, inflight: int, pin: bool
) -> dict[str, Any]:
    request = max(n for _, _, n in plan)
    # Resident memory, as the executor's pinned staging buffers are: first-touch page faults
    # inside the reads would be timed otherwise.
    bufs = [aligned_empty(request, pin=pin).fill_(0) for _ in range(inflight)]
    with open_reader(backend, qd, bs) as r:
        pending: deque[Any] = deque()
        t0 = time.perf_counter()
        for i, (path, off, n) in enumerate(plan):
            if len(pending) == inflight:
                pending.popleft().wait()  # frees buffer i % inflight for this request
            pending.append(r.submit(path, off, bufs[i % inflight][:n]))
        while pending:
            pending.popleft().wait()
        secs = time.perf_counter() - t0
    nbytes = sum(n for _, _, n in plan)
    return {"bytes": nbytes, "seconds": secs, "gbps": nbytes / secs / GB}


def run_h2d(nbytes: int = 1 << 30) -> dict[str, Any]:
    from zeroinf.engine.probe import measure_h2d  # the figure the executor plans with

    bps = measure_h2d(torch.device("cuda"), nbytes)
    return {"bytes": nbytes, "seconds": nbytes / bps, "gbps": bps / GB}


def run_pin(nbytes: int, chunk: int, threads: int) -> dict[str, Any]:
    """Page-locking rate of PinnedArena (allocate + cudaHostRegister) with `threads` threads."""
    t0 = time.perf_counter()
    arena = PinnedArena(nbytes, pin=True, chunk_bytes=chunk, threads=threads)
    secs = time.perf_counter() - t0
    arena.close()
    return {"bytes": nbytes, "seconds": secs, "gbps": nbytes / secs / GB}


def run_e2e(backend: str, qd: int, bs: int, plan: Plan, inflight: int) -> dict[str, Any]:
    """NVMe -> ring of inflight+1 pinned staging buffers -> GPU, copies on a side stream."""
    request = max(n for _, _, n in plan)
    nstage = inflight + 1
    staging = [aligned_empty(request, pin=True).fill_(0) for _ in range(nstage)]
    copied = [torch.cuda.Event() for _ in range(nstage)]  # the copy out of staging[k] is done
    slots = [torch.empty(request, dtype=torch.uint8, device="cuda") for _ in range(2)]
    stream = torch.cuda.Stream()
    with open_reader(backend, qd, bs) as r:
        reads: deque[Any] = deque()
        sent = 0
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i, (_, _, n) in enumerate(plan):
            while sent < len(plan) and sent - i < inflight:  # keep `inflight` reads running
                path, off, m = plan[sent]
                copied[sent % nstage].synchronize()
                reads.append(r.submit(path, off, staging[sent % nstage][:m]))
                sent += 1
            reads.popleft().wait()
            with torch.cuda.stream(stream):
                slots[i % 2][:n].copy_(staging[i % nstage][:n], non_blocking=True)
            copied[i % nstage].record(stream)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    nbytes = sum(n for _, _, n in plan)
    return {"bytes": nbytes, "seconds": secs, "gbps": nbytes / secs / GB}


def available(backends: list[str]) -> list[str]:
    ok = []
    for b in backends:
        try:
            open_reader(b).close()
            ok.append(b)
        except ConfigError as e:
            print(f"skipping {b}: {e}", flush=True)
    return ok


def machine() -> dict[str, Any]:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="folder of the file set (created)")
    ap.add_argument("--size-gb", type=float, default=4.0, help="size of the file set")
    ap.add_argument("--files", type=int, default=4, help="number of files in the set")
    ap.add_argument("--read-gb", type=float, help="bytes each variant reads (default: the set)")
    ap.add_argument("--request-size", default="256MiB", help="bytes per submit() (a unit)")
    ap.add_argument("--inflight", type=int, default=2, help="requests in flight (prefetch)")
    ap.add_argument("--queue-depths", default="8,32,64", help="comma-separated")
    ap.add_argument("--block-sizes", default="1MiB,4MiB", help="comma-separated")
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated")
    ap.add_argument("--pin-gb", type=float, default=2.0, help="bytes to pin in the pin test")
    ap.add_argument("--no-gpu", action="store_true", help="skip the GPU measurements")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        request = parse_bytes(args.request_size, "--request-size")
        block_sizes = [parse_bytes(b, "--block-sizes") for b in args.block_sizes.split(",")]
        depths = [int(q) for q in args.queue_depths.split(",")]
    except (ConfigError, ValueError) as e:
        print(f"bench_io: {e}", file=sys.stderr)
        return 2
    total = int(args.size_gb * GB)
    files = make_files(args.dir, total, args.files)
    nbytes = int((args.read_gb or args.size_gb) * GB)
    backends = available(args.backends.split(","))
    cuda = torch.cuda.is_available() and not args.no_gpu

    drop_note = drop_caches()
    print(f"page cache: {'dropped before each variant' if drop_note is None else drop_note}")
    rows: list[dict[str, Any]] = []

    def record(name: str, backend: str, qd: int | None, bs: int | None, res: dict) -> None:
        drop_caches()
        rows.append(
            {"variant": name, "backend": backend, "queue_depth": qd, "block_size": bs, **res}
        )
        print(f"{name:10s} {backend:10s} qd={qd} bs={bs} {res['gbps']:.3f} GB/s", flush=True)

    record("dd-first", "dd", None, 8 << 20, run_dd(files, nbytes))
    start = 0
    for backend in backends:
        for qd in depths:
            for bs in block_sizes:
                start += 3  # each variant starts elsewhere in the set
                plan = read_plan(files, nbytes, request, start)
                record(
                    "read", backend, qd, bs, run_reader(backend, qd, bs, plan, args.inflight, cuda)
                )
    record("dd-last", "dd", None, 8 << 20, run_dd(files, nbytes))

    disk = max(r["gbps"] for r in rows if r["backend"] == "dd")
    best = {
        b: max((r for r in rows if r["backend"] == b), key=lambda r: r["gbps"]) for b in backends
    }
    verdicts: dict[str, Any] = {"disk_gbps": disk, "best_gbps": {b: best[b]["gbps"] for b in best}}
    if "native" in best:
        nat = best["native"]["gbps"]
        others = [best[b]["gbps"] for b in best if b != "native"]
        verdicts["native_over_dd"] = nat / disk
        verdicts["native_ge_python"] = all(nat >= o for o in others)
    if cuda and backends:
        e2e_backend = "native" if "native" in best else backends[0]
        qd, bs = best[e2e_backend]["queue_depth"], best[e2e_backend]["block_size"]
        h2d = run_h2d()
        record("h2d", "pinned", None, None, h2d)
        pin = int(args.pin_gb * GB) // (256 << 20) * (256 << 20)
        for threads in (1, 8):
            record(f"pin-{threads}thr", "arena", None, 256 << 20, run_pin(pin, 256 << 20, threads))
        plan = read_plan(files, nbytes, request, start + 5)
        e2e = run_e2e(e2e_backend, qd, bs, plan, args.inflight)
        record("nvme->gpu", e2e_backend, qd, bs, e2e)
        verdicts["pcie_gbps"] = h2d["gbps"]
        verdicts["e2e_over_min_disk_pcie"] = e2e["gbps"] / min(disk, h2d["gbps"])

    result = {
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "page_cache": drop_note or "dropped",
        "rows": rows,
        "verdicts": verdicts,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    print_table(rows, disk, verdicts, result["machine"])
    return 0


def _size(n: int | None) -> str:
    if not n:
        return "-"
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}K"


def print_table(rows: list[dict[str, Any]], disk: float, v: dict[str, Any], m: dict) -> None:
    print(
        f"\nzeroinf bench_io  {m['date']}  {m['host']}  kernel {m['kernel']}  "
        f"GPU {m['cuda_device'] or '-'}"
    )
    print(
        f"{'variant':10s} {'backend':10s} {'qd':>4s} {'block':>6s} {'GB':>6s} {'s':>7s} "
        f"{'GB/s':>7s} {'x dd':>6s}"
    )
    for r in rows:
        qd = str(r["queue_depth"] or "-")
        bs = _size(r["block_size"])
        vs_dd = f"{r['gbps'] / disk:6.2f}" if r["backend"] not in ("pinned", "arena") else "-"
        print(
            f"{r['variant']:10s} {r['backend']:10s} {qd:>4s} {bs:>6s} {r['bytes'] / GB:6.2f} "
            f"{r['seconds']:7.2f} {r['gbps']:7.3f} {vs_dd:>6s}"
        )
    best = ", ".join(f"{b} {g:.3f}" for b, g in v["best_gbps"].items())
    print(f"disk (best dd) {disk:.3f} GB/s; best per backend (GB/s): {best}")
    if "native_over_dd" in v:
        ok = v["native_over_dd"] >= 0.95
        print(
            f"native best = {v['native_over_dd']:.3f} x dd (target >= 0.95): "
            f"{'PASS' if ok else 'FAIL'}"
        )
        print(f"native >= every Python backend: {'PASS' if v['native_ge_python'] else 'FAIL'}")
    if "e2e_over_min_disk_pcie" in v:
        ok = v["e2e_over_min_disk_pcie"] >= 0.9
        print(
            f"NVMe->GPU = {v['e2e_over_min_disk_pcie']:.3f} x min(disk {disk:.2f}, "
            f"PCIe {v['pcie_gbps']:.2f} GB/s) (target >= 0.9): {'PASS' if ok else 'FAIL'}"
        )


if __name__ == "__main__":
    sys.exit(main())
