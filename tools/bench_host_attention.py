"""Host memory and host attention on the GPU machine (the "cpu" KV tier's physical limits).

Measures, at a decode shape (default OPT-30B at batch 96, 544 positions):
  - host memory read bandwidth (a multi-threaded reduction over 4 GiB, torch's threads),
  - the tier's attention (models.host_attention.attend_cached) per layer, and variants,
  - pinned H2D alone, and H2D and host attention at once (both read host memory).
Prints a table last; --json writes the figures.

    python tools/bench_host_attention.py [--batch 96 --heads 56 --ctx 544 --head-dim 128]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zeroinf.engine.probe import (  # noqa: E402
    concurrent_with_h2d,
    measure_h2d,
    measure_host_memory,
    random_host_cache,
    seconds,
    streaming_bytes,
)
from zeroinf.models import host_attention as ha  # noqa: E402
from zeroinf.models.base import LayerKV  # noqa: E402
from zeroinf.models.host_attention import attend_cached, attend_host  # noqa: E402
from zeroinf.models.host_transfer import to_host  # noqa: E402

GB = 1e9


def host_copy_bytes_per_s(nbytes: int = 2 << 30) -> float:
    """Bytes read + written per second by a multi-threaded copy."""
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    b = torch.empty_like(a)
    return 2 * nbytes / seconds(lambda: b.copy_(a), torch.device("cpu"), repeat=5)


def cache(
    b: int, h: int, t: int, d: int, dtype: torch.dtype, kv_dtype: str | None = None,
    small_pages: bool = False,
) -> LayerKV:  # fmt: skip
    """The probe's random host cache (new_kv_cache's huge-page mapping), or a copy of it in
    torch's own memory (4 KiB pages where transparent huge pages are madvise-only)."""
    kv = random_host_cache(b, h, t, d, dtype, kv_dtype)
    if small_pages:
        kv = LayerKV(kv.k.clone(), kv.v.clone(), kv.k_scale, kv.v_scale, True)
    return kv


def decode_inputs(
    b: int, h: int, t: int, d: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [b, h, 1, d], mask [b, 1, 1, t] all visible, out [b, 1, h * d]) of a decode step."""
    q = torch.randn(b, h, 1, d).to(dtype)
    return q, torch.ones(b, 1, 1, t, dtype=torch.bool), torch.empty(b, 1, h * d, dtype=dtype)


def alone_and_beside(
    run: Callable[[], None], nbytes: int, cuda: torch.device | None
) -> tuple[float, float, float]:
    """(GB/s alone, GB/s beside H2D, H2D GB/s beside it) of `run`, which reads `nbytes` of
    cache (NaN beside H2D without CUDA)."""
    time.sleep(0.1)  # torch's OpenMP threads quiet
    alone = nbytes / seconds(run, torch.device("cpu"), 5) / GB
    if cuda is None:
        return alone, float("nan"), float("nan")
    copied, calls = concurrent_with_h2d(run, cuda, 1.5)
    return alone, calls * nbytes / GB, copied / GB


def attention_s(
    b: int, h: int, t: int, d: int, dtype: torch.dtype, kv_dtype: str | None = None,
    small_pages: bool = False, ahead: int | None = None,
) -> tuple[float, int, Callable[[], None]]:  # fmt: skip
    """(seconds per call, cache bytes, the call) of one decode layer's host attention:
    attend_cached as the tier runs it, or with `ahead` the native kernel at that prefetch
    distance."""
    kv = cache(b, h, t, d, dtype, kv_dtype, small_pages)
    q, mask, out = decode_inputs(b, h, t, d, dtype)
    nbytes = sum(x.nbytes for x in (kv.k, kv.v, kv.k_scale, kv.v_scale) if x is not None)

    def run() -> None:
        if ahead is None:
            attend_cached(q, kv, t, mask, d**-0.5, out)
        else:
            assert ha.native_decode(q, kv, t, mask, d**-0.5, out, ahead=ahead)

    return seconds(run, torch.device("cpu"), 5), nbytes, run


def load_module(path: Path) -> ModuleType:
    """A build of native/host_attn.c at `path` (another version of the kernel, for an A/B in
    one call: tools/device_run.sh's hattnab stage builds the previous commit's)."""
    spec = importlib.util.spec_from_file_location("_native_attn", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_sweep(
    b: int, h: int, t: int, d: int, cuda: torch.device | None, baseline: Path | None = None,
    kv_dtype: str | None = None,
) -> list[tuple]:  # fmt: skip
    """(name, GB/s alone, GB/s beside H2D, H2D GB/s beside it) of the native kernel at
    several software prefetch distances over one fp16 cache (or an int8 one, with its scales);
    with `baseline`, that build's at 0 and 8 rows too, in turn with this one's (machines
    differ more than kernels do)."""
    kv = cache(b, h, t, d, torch.float16, kv_dtype)
    q, mask, out = decode_inputs(b, h, t, d, torch.float16)
    nbytes = sum(x.nbytes for x in (kv.k, kv.v, kv.k_scale, kv.v_scale) if x is not None)
    current = ha.native
    variants = [("", current, a) for a in (0, 4, 8, 16, 32)]
    if baseline is not None:
        old = load_module(baseline)
        variants = [v for a in (0, 8) for v in (("baseline, ", old, a), ("", current, a))]
        variants += [("", current, a) for a in (4, 16, 32)]
    rows = []
    for label, module, ahead in variants:

        def run(ahead: int = ahead) -> None:
            assert ha.native_decode(q, kv, t, mask, d**-0.5, out, ahead=ahead)

        name = f"{label}{kv_dtype or 'fp16'}, prefetch {ahead} rows ahead"
        ha.native = module
        alone, beside, copied = alone_and_beside(run, nbytes, cuda)
        ha.native = current
        rows.append((name, alone, beside, copied))
        print(f"kernel sweep: {name}: {alone:.1f} GB/s alone, {beside:.1f} beside H2D "
              f"({copied:.1f} GB/s H2D)", flush=True)  # fmt: skip
    return rows


def direct_and_queued(
    kvs: list[LayerKV], b: int, h: int, t: int, d: int, cuda: torch.device
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The kernel over every layer's cache in `kvs` in turn: called from this thread, and
    queued in a CUDA stream as the tier runs it in a decode step (host functions on the
    driver's thread, synced once at the end)."""
    q, mask, out = decode_inputs(b, h, t, d, torch.float16)
    stream = torch.cuda.Stream(cuda)
    done = torch.cuda.Event(blocking=True)

    def direct() -> None:
        for kv in kvs:
            assert ha.native_decode(q, kv, t, mask, d**-0.5, out)

    def queued() -> None:
        for kv in kvs:
            assert ha.native_decode(q, kv, t, mask, d**-0.5, out, stream=stream)
        done.record(stream)
        done.synchronize()

    return direct, queued


def queued_vs_direct(
    b: int, h: int, t: int, d: int, cuda: torch.device, layers: int = 4
) -> list[tuple]:
    """(name, GB/s alone, GB/s beside H2D, H2D GB/s beside it) of the kernel over `layers`
    layers' caches in turn (more than the L3 holds), called from this thread, and queued in a
    CUDA stream as the tier runs it in a decode step (host functions on the driver's thread,
    synced once at the end): whether the run's path reads slower than the probe's."""
    kvs = [cache(b, h, t, d, torch.float16) for _ in range(layers)]
    nbytes = layers * (kvs[0].k.nbytes + kvs[0].v.nbytes)
    direct, queued = direct_and_queued(kvs, b, h, t, d, cuda)
    rows = []
    for name, run in (("called directly", direct), ("queued in a stream", queued),
                      ("called directly, again", direct)):  # fmt: skip
        rows.append((f"{layers} layers, {name}", *alone_and_beside(run, nbytes, cuda)))
        print(f"path: {rows[-1]}", flush=True)
    return rows


def footprint(
    b: int, h: int, t: int, d: int, cuda: torch.device | None, counts: tuple[int, ...] = (4, 48),
    aheads: tuple[int, ...] = (0, 8, 16, 32, 64),
) -> list[tuple]:  # fmt: skip
    """(name, GB/s alone, GB/s beside H2D, H2D GB/s beside it) of the kernel, and of torch's sum
    over the same memory, over `counts` layers' caches in turn: 4 layers (6 GB at OPT-30B's
    batch 96, 20 x the L3) as the probe reads, and 48 (72 GB) as a decode step does; over the
    most layers, the kernel at each software prefetch distance in `aheads` (8: the default).
    Inside the runs the kernel read 0.69-1.0 of the probe's alone rate, by machine
    (docs/benchmarks.md): if the whole footprint reads slower than a few GB of it, the
    footprint is the cause."""
    first = cache(b, h, t, d, torch.float16)
    kvs = [first] + [random_host_cache(b, h, t, d, torch.float16, like=first)
                     for _ in range(max(counts) - 1)]  # fmt: skip
    q, mask, out = decode_inputs(b, h, t, d, torch.float16)
    per_layer = first.k.nbytes + first.v.nbytes
    rows = []
    for n in counts:
        some = kvs[:n]
        flat = [x.view(-1).view(torch.float32) for kv in some for x in (kv.k, kv.v)]

        def attend(some: list[LayerKV] = some, ahead: int = 8) -> None:  # 8: the default
            for kv in some:
                assert ha.native_decode(q, kv, t, mask, d**-0.5, out, ahead=ahead)

        def total(flat: list[torch.Tensor] = flat) -> None:
            for x in flat:
                x.sum()

        # over the most layers the sweep's 8-row run is the default kernel's: not timed twice
        kernels = ([(f"kernel, prefetch {a} rows" + (" (the default)" if a == 8 else ""),
                     partial(attend, ahead=a)) for a in aheads]
                   if n == max(counts) else [("kernel", attend)])  # fmt: skip
        runs = [*kernels, ("torch sum", total)]
        for name, run in runs:
            rows.append((f"{name}, {n} layers ({n * per_layer / GB:.0f} GB)",
                         *alone_and_beside(run, n * per_layer, cuda)))  # fmt: skip
            print(f"footprint: {rows[-1]}", flush=True)
    return rows


def cache_sum_bytes_per_s(b: int, h: int, t: int, d: int) -> float:
    """Bytes/s of torch's sum over an fp16 host cache's own memory (viewed as float32)."""
    kv = cache(b, h, t, d, torch.float16)
    flat = [x.view(-1).view(torch.float32) for x in (kv.k, kv.v)]
    s = seconds(lambda: [x.sum() for x in flat], torch.device("cpu"), 5)
    return (kv.k.nbytes + kv.v.nbytes) / s


def full_path_s(b: int, h: int, t: int, d: int) -> dict[str, float]:
    """Seconds of one decode layer's whole host path (models.host_attention.attend_host): q, k,
    v on the GPU to the host, the cache write and the attention, the output back, synced; and
    of its parts alone."""
    kv = cache(b, h, t, d, torch.float16)
    q, k, v = (torch.randn(b, h, 1, d, device="cuda", dtype=torch.float16) for _ in "qkv")
    mask = torch.ones(b, 1, 1, t, dtype=torch.bool, device="cuda")
    cpu = torch.device("cpu")
    hq, hk, hv, hmask = to_host(q, k, v, mask)
    out = torch.empty(b, 1, h * d, dtype=torch.float16, pin_memory=True)

    def whole() -> None:
        attend_host(q, k, v, kv, t - 1, mask, d**-0.5, False)
        torch.cuda.synchronize()

    def back() -> None:
        out.to("cuda", non_blocking=True)
        torch.cuda.synchronize()

    return {
        "whole": seconds(whole, cpu, 5),
        "to_host": seconds(lambda: to_host(q, k, v, mask), cpu, 5),
        "kernel": seconds(
            lambda: ha.native_decode(hq, kv, t, hmask, d**-0.5, out, new=(hk, hv)), cpu, 5
        ),  # fmt: skip
        "pinned_empty": seconds(
            lambda: torch.empty(b, 1, h * d, dtype=torch.float16, pin_memory=True), cpu, 5
        ),  # fmt: skip
        "back": seconds(back, cpu, 5),
    }


def decode_shape_args(ap: argparse.ArgumentParser) -> None:
    """--batch, --heads, --ctx, --head-dim: one decode layer's shape (default OPT-30B's step at
    batch 96, 544 positions), and --json."""
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--heads", type=int, default=56)
    ap.add_argument("--ctx", type=int, default=544)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--json", type=Path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    decode_shape_args(ap)
    ap.add_argument("--quick", action="store_true", help="the tier's own fp16 path only")
    ap.add_argument("--sweep", action="store_true", help="only the native kernel's variants")
    ap.add_argument("--baseline", type=Path, help="with --sweep: another build of the kernel (.so)")
    ap.add_argument("--kv-dtype", choices=["int8"], help="with --sweep: over an int8 cache")
    ap.add_argument(
        "--footprint",
        action="store_true",
        help="the kernel and torch's sum over 4 layers' caches and over 48",
    )
    a = ap.parse_args()
    flags = ""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        print(info)
        print(Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text())
        wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
        flags = " ".join(f for f in wanted if f in info)
    except OSError as e:
        print(f"(system info: {e})")
    if a.sweep or a.footprint:
        cuda = torch.device("cuda") if torch.cuda.is_available() else None
        if a.footprint:
            sweep = footprint(a.batch, a.heads, a.ctx, a.head_dim, cuda)
        else:
            sweep = kernel_sweep(a.batch, a.heads, a.ctx, a.head_dim, cuda, a.baseline,
                                 a.kv_dtype)  # fmt: skip
            if cuda is not None:
                sweep += queued_vs_direct(a.batch, a.heads, a.ctx, a.head_dim, cuda)
        print("\n| kernel variant | alone GB/s | beside H2D GB/s | H2D beside it GB/s |")
        print("|---|---|---|---|")
        for name, *figures in sweep:
            print(f"| {name} | " + " | ".join(f"{x:.1f}" for x in figures) + " |")
        if a.json:
            a.json.write_text(json.dumps(sweep, indent=1))
        return
    rows: list[tuple[str, float, str]] = []
    res: dict[str, float] = {"threads": torch.get_num_threads(), "cpus": os.cpu_count() or 0}
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, flags: {flags}")
    res["host_read"] = measure_host_memory(torch.device("cpu"), 4 << 30)  # the CPU's reads alone
    rows.append(("host read (sum 4 GiB fp32)", res["host_read"] / GB, "GB/s"))
    # the same over 1 GiB, which the last-level cache partly holds (the probe's size until
    # zeroinf-probe/4; probe.streaming_bytes)
    res["host_read_1gib"] = measure_host_memory(torch.device("cpu"), 1 << 30)
    rows.append(("host read (sum 1 GiB fp32)", res["host_read_1gib"] / GB, "GB/s"))
    res["host_copy"] = host_copy_bytes_per_s()
    rows.append(("host copy (read+write)", res["host_copy"] / GB, "GB/s"))
    b, h, t, d = a.batch, a.heads, a.ctx, a.head_dim
    native = ha.native
    threads = torch.get_num_threads()
    f16 = torch.float16
    # (name, dtype, kv dtype, native module or None, threads, 4 KiB pages, prefetch distance)
    variants = [("fp16", f16, None, native, threads, False, None),
                ("fp16 torch", f16, None, None, threads, False, None),
                ("fp16 4 KiB pages", f16, None, native, threads, True, None),
                ("fp16 no prefetch", f16, None, native, threads, False, 0),
                ("fp16 prefetch 4", f16, None, native, threads, False, 4),
                ("fp16 prefetch 8", f16, None, native, threads, False, 8),
                ("fp16 prefetch 12", f16, None, native, threads, False, 12),
                ("fp16 prefetch 16", f16, None, native, threads, False, 16),
                ("fp16 4 KiB pages, no prefetch", f16, None, native, threads, True, 0),
                ("bf16", torch.bfloat16, None, native, threads, False, None),
                ("fp32", torch.float32, None, native, threads, False, None),
                ("fp32 torch", torch.float32, None, None, threads, False, None),
                ("int8 (fp16 q)", f16, "int8", native, threads, False, None),
                ("int8 torch (fp16 q)", f16, "int8", None, threads, False, None)]  # fmt: skip
    variants += [(f"fp16 {n} threads", f16, None, native, n, False, None)
                 for n in (1, 4, 8) if n < threads]  # fmt: skip
    if native is None:
        variants = [v for v in variants if v[3] is None]
    if a.quick:
        variants = variants[:1]
    print(f"native module: {native is not None}" + (f", {native.simd()} path" if native else ""))
    run16 = None
    for name, dtype, kvd, mod, n, small, ahead in variants:
        ha.native = mod
        torch.set_num_threads(n)
        s, nbytes, run = attention_s(b, h, t, d, dtype, kvd, small, ahead)
        torch.set_num_threads(threads)
        res[f"attn_{name}_ms"] = s * 1e3
        res[f"attn_{name}_gbps"] = nbytes / s / GB
        rows.append((f"attention {name} b{b} h{h} t{t}: ms/layer", s * 1e3,
                     f"{nbytes / s / GB:.1f} GB/s of {nbytes / GB:.2f} GB"))  # fmt: skip
        if name == "fp16":
            run16, bytes16 = run, nbytes
        else:
            del run
    ha.native = native
    # The same bytes read by torch's sum (float32 view of the fp16 cache): where this is as slow
    # as the kernel, the cache's memory (its pages' placement), not the kernel, sets the rate.
    res["cache_sum_gbps"] = cache_sum_bytes_per_s(b, h, t, d) / GB
    rows.append(("host read of the fp16 cache's own memory (sum)", res["cache_sum_gbps"], "GB/s"))
    if torch.cuda.is_available() and run16 is not None:
        cuda = torch.device("cuda")
        h2d = measure_h2d(cuda, 1 << 30)  # the probe's own figure
        res["h2d"] = h2d
        rows.append(("H2D alone (1 GiB pinned)", h2d / GB, "GB/s"))
        c_h2d, calls = concurrent_with_h2d(run16, cuda, 3.0)
        res["h2d_during_attn"] = c_h2d
        res["attn_fp16_during_h2d_gbps"] = calls * bytes16 / GB
        rows.append(("H2D during fp16 attention", c_h2d / GB, "GB/s"))
        rows.append(("fp16 attention during H2D", calls * bytes16 / GB,
                     f"GB/s ({1e3 / calls:.1f} ms/layer)"))  # fmt: skip
        res["host_memory_1gib"] = measure_host_memory(cuda, 1 << 30, 3.0)
        rows.append(("host memory: H2D + host read (sum 1 GiB) at once", res["host_memory_1gib"]
                     / GB, "GB/s (the probe's until zeroinf-probe/4)"))  # fmt: skip
        res["host_memory"] = measure_host_memory(cuda, streaming_bytes(4 << 30), 3.0)
        rows.append(("host memory: H2D + host read (sum) at once", res["host_memory"] / GB,
                     "GB/s (the probe's host_memory_bytes_per_s)"))  # fmt: skip
        parts = full_path_s(b, h, t, d)
        res.update({f"path_{k}_ms": x * 1e3 for k, x in parts.items()})
        for k, x in parts.items():
            rows.append((f"attend_host path: {k}, ms/layer", x * 1e3, "ms"))
    print("\n| figure | value | unit |\n|---|---|---|")
    for name, v, unit in rows:
        print(f"| {name} | {v:.2f} | {unit} |")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
