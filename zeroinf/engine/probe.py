"""The machine's rates, measured (seconds on a GPU, most of them filling and reading the host
tier's 4 GiB working sets) and cached: the cost model plans from them
(costmodel.py) and zeroinf-bench reports its roofline against the same measurement.

The cache is JSON in `$ZEROINF_CACHE_DIR` (else `$ZEROINF_CACHE`, the converter's cache folder,
else ~/.cache/zeroinf), file probe.json, one entry per key: device name, torch version, dtype,
the matmul shape and the disk folder measured. A load reads its entry and says so in the log;
`refresh=True` measures again (zeroinf-bench always does, so its roofline is from its own run).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zeroinf.models.base import LayerKV
from zeroinf.sizes import ALIGN

log = logging.getLogger("zeroinf")

ENV_CACHE_DIR = "ZEROINF_CACHE_DIR"
CACHE_FILE = "probe.json"
# /2: CPU attention is the host KV tier's own code, int8 too; /3: its native decode kernel;
# /4: decode-like attention shape, and attention and H2D measured beside each other; working
# sets the last-level cache cannot hold; /5: an int8 cache's attention by the native kernel
CACHE_FORMAT = "zeroinf-probe/5"
DISK_BYTES = 1 << 30  # read at most this much of a folder's largest files (about 1 s on NVMe)


@dataclass(frozen=True)
class Rates:
    """Bytes/s and FLOP/s of one machine. On a CPU device "device" memory is host memory, so
    h2d and d2h are host memcpy rates (the CPU streaming loop copies units the same way)."""

    device_name: str
    flops: float  # dtype matmul [m, k] x [k, n] at the model's hidden and FFN sizes
    hbm_bytes_per_s: float  # device copy, read + write bytes
    h2d_bytes_per_s: float  # pinned host -> device
    d2h_bytes_per_s: float  # device -> pinned host
    cpu_attn_bytes_per_s: float  # cache bytes/s host attention reads in a decode step
    disk_bytes_per_s: float | None = None  # O_DIRECT reads of the offload folder (NVMe tier)
    cpu_attn_int8_bytes_per_s: float | None = None  # the same over an int8 cache (with scales)
    # Host memory bytes/s read by the CPU's threads and the H2D stream at once (their shared
    # limit: the host KV tier's attention and the weights' copies both read host memory).
    host_memory_bytes_per_s: float | None = None
    # The same host attention and the H2D stream measured at once (GPU only): the cost model
    # overlaps the host tier's attention with the weights' stream, and each slows the other.
    cpu_attn_h2d_bytes_per_s: float | None = None  # attention's cache bytes/s beside H2D
    h2d_cpu_attn_bytes_per_s: float | None = None  # H2D bytes/s beside that attention

    def stream_bytes_per_s(self, offload: str) -> float:
        """What feeds the streamed units: H2D, or min(disk, H2D) from NVMe."""
        if offload == "nvme" and self.disk_bytes_per_s:
            return min(self.disk_bytes_per_s, self.h2d_bytes_per_s)
        return self.h2d_bytes_per_s


def cache_path() -> Path:
    root = os.environ.get(ENV_CACHE_DIR) or os.environ.get("ZEROINF_CACHE")
    return Path(root or Path.home() / ".cache/zeroinf") / CACHE_FILE


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {platform.machine()} x{os.cpu_count()}"


def probe(
    device: torch.device,
    k: int,
    n: int,
    dtype: torch.dtype,
    disk_dir: str | os.PathLike[str] | None = None,
    io_backend: str | None = None,
    refresh: bool = False,
) -> Rates:
    """The rates of this machine for a model of hidden size `k` and FFN size `n` in `dtype`
    (and of `disk_dir`'s drive when given): from the cache unless `refresh`, else measured and
    written to the cache."""
    disk = str(Path(disk_dir).resolve()) if disk_dir is not None else "-"
    key = (
        f"{device_name(device)} | torch {torch.__version__} | {str(dtype)[6:]} | matmul {k}x{n}"
        f" | disk {disk} ({io_backend or 'auto'})"
    )
    path = cache_path()
    entries = _read_cache(path)
    if not refresh and key in entries:
        try:
            rates = Rates(**entries[key]["rates"])
            log.info("using cached probe from %s (%s); refresh=True measures again", path, key)
            return rates
        except (TypeError, KeyError) as e:
            log.warning("%s: entry %r unusable (%s): measuring again", path, key, e)
    t0 = time.perf_counter()
    rates = measure(device, k, n, dtype, disk_dir, io_backend)
    log.info("probed %s in %.1f s: %s", key, time.perf_counter() - t0, _summary(rates))
    entries[key] = {"rates": dataclasses.asdict(rates), "date": time.strftime("%Y-%m-%d %H:%M")}
    _write_cache(path, entries)
    return rates


def measure(
    device: torch.device,
    k: int,
    n: int,
    dtype: torch.dtype,
    disk_dir: str | os.PathLike[str] | None = None,
    io_backend: str | None = None,
) -> Rates:
    """Measure every rate now (small sizes on a CPU device, so tests stay fast)."""
    cuda = device.type == "cuda"
    h2d, d2h = measure_copy(device, (256 << 20) if cuda else (16 << 20))
    # one working set of host caches for the attention alone and beside H2D (4 GiB on a GPU)
    nbytes, run = _cpu_attention(dtype, large=cuda)
    attn = nbytes / seconds(run, torch.device("cpu"), repeat=5)
    attn_h2d, h2d_attn = _attention_beside_h2d(nbytes, run, device) if cuda else (None, None)
    del run  # its caches go before the int8 ones are made
    rates = Rates(
        device_name(device),
        _matmul_rate(device, k, n, dtype),
        _copy_rate(device),
        h2d,
        d2h,
        attn,
        measure_disk(disk_dir, io_backend) if disk_dir is not None else None,
        measure_cpu_attention(dtype, large=cuda, kv_dtype="int8"),
        measure_host_memory(device, streaming_bytes(4 << 30) if cuda else (64 << 20), 2.0),
        attn_h2d,
        h2d_attn,
    )
    if cuda:  # hand the probe's 4 GiB back before the model's buffers are allocated
        torch.cuda.empty_cache()
    return rates


def _matmul_rate(device: torch.device, k: int, n: int, dtype: torch.dtype) -> float:
    """FLOP/s of [M, K] x [K, N] (M = 8192 on a GPU: a prefill chunk's order of tokens)."""
    m = 8192 if device.type == "cuda" else 256
    x = torch.randn(m, k, device=device).to(dtype)  # [M, K]
    w = torch.randn(n, k, device=device).to(dtype)  # [N, K], like a linear layer's weight
    return 2 * m * k * n / seconds(lambda: x @ w.T, device)


def _copy_rate(device: torch.device) -> float:
    """Device memory bytes/s, read + write, of one large copy."""
    size = (2 << 30) if device.type == "cuda" else (16 << 20)
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / seconds(lambda: dst.copy_(src), device)


def seconds(fn: Callable[[], Any], device: torch.device, repeat: int = 9) -> float:
    """Median seconds of one call of `fn` (after one warm-up call), CUDA events on a GPU."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_copy(device: torch.device, nbytes: int) -> tuple[float, float]:
    """(H2D, D2H) bytes/s between one pinned host buffer and the device."""
    from zeroinf.io import aligned_empty

    host = aligned_empty(nbytes, pin=device.type == "cuda")[:nbytes]
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = nbytes / seconds(lambda: dev.copy_(host, non_blocking=True), device)
    d2h = nbytes / seconds(lambda: host.copy_(dev, non_blocking=True), device)
    return h2d, d2h


def measure_h2d(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Pinned host -> device bytes/s (the figure a plan's predicted transfer time uses)."""
    return measure_copy(device, nbytes)[0]


def random_host_cache(
    b: int, h: int, t: int, d: int, dtype: torch.dtype, kv_dtype: str | None = None,
    like: LayerKV | None = None, device: torch.device | None = None,
) -> LayerKV:  # fmt: skip
    """One layer's host ("cpu" tier) cache of [b, h, t, d] random keys and values in `dtype`, or
    int8 with scales 0.01: what host attention is timed over (here, and by
    tools/bench_host_attention.py); `like`: a copy of that cache instead (fast). `device`: the
    compute device the cache serves (default the CPU; new_kv_cache pins a host cache for a
    CUDA device)."""
    from zeroinf.engine.kvcache import new_kv_cache
    from zeroinf.models import ModelConfig

    cfg = ModelConfig(model_type="llama", num_layers=1, hidden_size=h * d, num_heads=h,
                      num_kv_heads=h, head_dim=d, intermediate_size=1, vocab_size=1,
                      max_positions=t, tie_embeddings=False, norm_eps=1e-5,
                      act="silu")  # fmt: skip
    dev = device or torch.device("cpu")
    kv = new_kv_cache(cfg, b, t, dtype, dev, kv_dtype, host_layers=(0,))[0]
    if like is not None:
        for x, y in ((kv.k, like.k), (kv.v, like.v), (kv.k_scale, like.k_scale),
                     (kv.v_scale, like.v_scale)):  # fmt: skip
            if x is not None:
                x.copy_(y)
        return kv
    for x in (kv.k, kv.v):
        x.copy_(
            torch.randn(x.shape).to(x.dtype)
            if kv_dtype is None
            else torch.randint_like(x, -127, 128)
        )
    for s in (kv.k_scale, kv.v_scale):
        if s is not None:
            s.fill_(0.01)
    return kv


def measure_cpu_attention(dtype: torch.dtype, large: bool, kv_dtype: str | None = None) -> float:
    """Cache bytes/s that host attention (the "cpu" KV tier's own code,
    models.host_attention.attend_cached) reads for one decode token per row: q [B, H, 1, D]
    against a host cache of [B, H, T, D] keys and values in `dtype`, or int8 with scales."""
    nbytes, run = _cpu_attention(dtype, large, kv_dtype)
    return nbytes / seconds(run, torch.device("cpu"), repeat=5)


def measure_cpu_attention_with_h2d(
    device: torch.device, dtype: torch.dtype, seconds_: float = 1.0
) -> tuple[float, float]:
    """(cache bytes/s, H2D bytes/s) of measure_cpu_attention's large run in `dtype` while pinned
    H2D copies run beside it: both read host memory, and each slows the other. Of three windows
    of seconds_ / 3, the one with the best attention rate."""
    return _attention_beside_h2d(*_cpu_attention(dtype, large=True), device, seconds_)


def _attention_beside_h2d(
    nbytes: int, run: Callable[[], None], device: torch.device, seconds_: float = 1.0
) -> tuple[float, float]:
    """measure_cpu_attention_with_h2d over `run`, an attention over `nbytes` of cache."""
    best = (0.0, 0.0)
    for _ in range(3):  # a capacity: the best of three windows (the host is shared)
        copied, calls_per_s = concurrent_with_h2d(run, device, seconds_ / 3)
        best = max(best, (calls_per_s * nbytes, copied))  # by attention rate first
    return best


def _cpu_attention(
    dtype: torch.dtype, large: bool, kv_dtype: str | None = None
) -> tuple[int, Callable[[], None]]:
    """(cache bytes, one decode step's host attention over them) for the measures above."""
    from zeroinf.models.host_attention import attend_cached

    # 1 GiB of 16-bit cache in 4096 (row, head) tasks of 512 positions on a GPU machine: a real
    # decode step's blocks are a few hundred positions long, and 2048-position blocks read ~25%
    # faster, which made the cost model optimistic. Calls go round copies of it that together
    # outgrow the last-level cache, as a decode step's layers do (streaming_bytes).
    b, h, t, d = (128, 32, 512, 128) if large else (2, 4, 512, 64)
    kv = random_host_cache(b, h, t, d, dtype, kv_dtype)
    nbytes = sum(x.nbytes for x in (kv.k, kv.v, kv.k_scale, kv.v_scale) if x is not None)
    copies = -(-streaming_bytes(4 << 30) // nbytes) if large else 1
    caches = itertools.cycle(
        [kv] + [random_host_cache(b, h, t, d, dtype, kv_dtype, like=kv) for _ in range(copies - 1)]
    )
    q = torch.randn(b, h, 1, d).to(dtype)
    mask = torch.ones(b, 1, 1, t, dtype=torch.bool)
    out = torch.empty(b, 1, h * d, dtype=dtype)

    def run() -> None:
        attend_cached(q, next(caches), t, mask, d**-0.5, out)

    # torch's OpenMP threads spin for milliseconds after the fills' parallel ops, on the cores
    # the native kernel's threads need; a decode step runs no torch CPU op between its layers.
    time.sleep(0.1)
    return nbytes, run


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (sysfs; 0 where unknown)."""
    sizes = [0]
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes)


def streaming_bytes(floor: int) -> int:
    """A working set the last-level cache cannot serve: 8 x its size, at least `floor`. A host
    KV cache is tens of GB read once per step, and a timing over a buffer the cache could partly
    hold need not say how fast that is: over one 1 GiB cache (the H100 machine's L3: 300 MiB)
    the probe's attention read 113.7 GB/s where the run then read 78 (2026-11-24, run 15);
    torch's sum read 85.6 over 1 GiB and 90.6 over 4 GiB on another machine of the kind."""
    return max(floor, 8 * last_level_cache_bytes())


def host_reader(
    nbytes: int, over: list[torch.Tensor] | None = None
) -> tuple[Callable[[], None], int]:
    """(a function that reads host memory on all torch threads, the bytes it reads): a sum
    over a fresh buffer of `nbytes`, or over the bytes of the contiguous host tensors `over`
    (a run's own cache, whose tens of GB may read slower than a few: zeroinf-bench reports
    both). The sum is of int64 words, whatever the bytes hold, so its speed does not depend
    on the values."""
    if over is None:
        xs = [torch.ones(nbytes // 8, dtype=torch.int64)]
    else:  # int64 views of the tensors' own bytes: no copies
        xs = [t.view(-1).view(torch.uint8).view(torch.int64) for t in over]

    def read() -> None:
        for x in xs:
            x.sum()

    return read, sum(x.nbytes for x in xs)


def measure_host_memory(
    device: torch.device, nbytes: int, seconds_: float = 1.0, over: list[torch.Tensor] | None = None
) -> float:
    """Host memory bytes/s with every torch thread reading (host_reader's sum over `nbytes`, or
    over the tensors `over`) while, on a GPU, pinned H2D copies run beside them: the total of
    both, which is what the host KV tier's attention and the weights' stream share; the best
    of three windows of seconds_ / 3."""
    read, nbytes = host_reader(nbytes, over)
    cpu = torch.device("cpu")
    if device.type != "cuda":
        return nbytes / seconds(read, cpu, repeat=3)
    best = 0.0
    for _ in range(3):  # a capacity: the best of three windows (the host is shared)
        copied, calls = concurrent_with_h2d(read, device, seconds_ / 3)
        best = max(best, copied + calls * nbytes)
    return best


def concurrent_with_h2d(
    fn: Callable[[], Any], device: torch.device, seconds_: float, nbytes: int = 256 << 20,
    pieces: int = 1,
) -> tuple[float, float]:  # fmt: skip
    """(H2D bytes/s, calls of `fn` per second) with pinned H2D copies of `nbytes` looping on a
    side stream from another thread while `fn` runs again and again on this one; the copies
    read `pieces` host buffers in turn (several: more than the last-level cache holds, as a
    run's streamed weights are)."""
    sources = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(pieces)]
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream(device)
    stop = threading.Event()
    copies = [0]
    errors: list[BaseException] = []

    # CUDA's default wait spins on a core (one context, more cores than contexts), which would
    # take one of the cores the measured CPU work runs on; a blocking event's wait sleeps.
    done = torch.cuda.Event(blocking=True)

    def copier() -> None:
        try:  # inference mode is per thread: `dev` may be an inference tensor
            with torch.inference_mode(), torch.cuda.stream(stream):
                while not stop.is_set():
                    dev.copy_(sources[copies[0] % pieces], non_blocking=True)
                    done.record(stream)
                    done.synchronize()
                    copies[0] += 1
        except BaseException as e:
            errors.append(e)

    th = threading.Thread(target=copier, daemon=True)
    th.start()
    try:
        fn()  # warm, and the copies under way
        c0, t0, n = copies[0], time.perf_counter(), 0
        while (dt := time.perf_counter() - t0) < seconds_ or n == 0:
            fn()
            n += 1
        copied = (copies[0] - c0) * nbytes / dt
    finally:
        stop.set()
        th.join()
    if errors or not copied:  # a figure without its copies would pass for the shared limit
        raise RuntimeError(f"H2D copies beside the CPU did not run: {errors[:1] or 'none done'}")
    return copied, n / dt


def drop_page_cache() -> bool:
    """Drop the kernel's page cache (needs root); False where not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def measure_disk(
    folder: str | os.PathLike[str],
    io_backend: str | None = None,
    max_bytes: int = DISK_BYTES,
) -> float:
    """Read bandwidth (O_DIRECT, the reader the executor uses) over the largest files of
    `folder`, up to `max_bytes`, after dropping the page cache where allowed (root)."""
    from zeroinf.errors import ConfigError
    from zeroinf.io import aligned_empty, open_reader

    files = sorted(
        ((p, p.stat().st_size // ALIGN * ALIGN) for p in Path(folder).iterdir() if p.is_file()),
        key=lambda f: -f[1],
    )
    plan: list[tuple[Path, int]] = []
    total = 0
    for p, size in files:
        take = min(size, max_bytes - total) // ALIGN * ALIGN
        if take <= 0:
            break
        plan.append((p, take))
        total += take
    if not plan:
        raise ConfigError(f"{folder}: no file of {ALIGN} bytes or more to measure the disk with")
    buf = aligned_empty(plan[0][1], pin=False)
    drop_page_cache()  # a backend that falls back to buffered reads would otherwise read RAM
    with open_reader(io_backend) as r:
        t = time.perf_counter()
        for p, take in plan:
            r.submit(str(p), 0, buf[:take]).wait()
        dt = time.perf_counter() - t
    return total / dt


def _summary(r: Rates) -> str:
    disk = f", disk {r.disk_bytes_per_s / 1e9:.2f} GB/s" if r.disk_bytes_per_s else ""
    beside = (
        f", CPU attention beside H2D {r.cpu_attn_h2d_bytes_per_s / 1e9:.1f} GB/s, H2D beside it "
        f"{r.h2d_cpu_attn_bytes_per_s / 1e9:.1f} GB/s"
        if r.cpu_attn_h2d_bytes_per_s and r.h2d_cpu_attn_bytes_per_s
        else ""
    )
    return (
        f"matmul {r.flops / 1e12:.3g} TFLOP/s, HBM {r.hbm_bytes_per_s / 1e9:.0f} GB/s, "
        f"H2D {r.h2d_bytes_per_s / 1e9:.1f} GB/s, D2H {r.d2h_bytes_per_s / 1e9:.1f} GB/s, "
        f"CPU attention {r.cpu_attn_bytes_per_s / 1e9:.1f} GB/s (int8 cache "
        f"{(r.cpu_attn_int8_bytes_per_s or 0) / 1e9:.1f}), host memory "
        f"{(r.host_memory_bytes_per_s or 0) / 1e9:.1f} GB/s{beside}{disk}"
    )


def _read_cache(path: Path) -> dict[str, Any]:
    """The cache's entries; an unreadable or foreign file counts as empty (with a warning), and
    is replaced by the next write."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or raw.get("format") != CACHE_FORMAT:
            raise ValueError(f"not a {CACHE_FORMAT} file")
        entries = raw["entries"]
        if not isinstance(entries, dict):
            raise ValueError("'entries' is not an object")
        return entries
    except (OSError, ValueError, KeyError) as e:
        log.warning("probe cache %s unreadable (%s): measuring again", path, e)
        return {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Atomic replace (ranks of one host may probe at once; the last writer wins)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: plan from this measurement, probe again next time
        log.warning("probe cache %s not written (%s)", path, e)
