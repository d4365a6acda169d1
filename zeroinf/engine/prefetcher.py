"""The prefetcher: the only code that creates streams, events and pinned buffers.

It moves unit bytes and nothing else: the executor asks for unit j's bytes on the device
(`acquire(j)`), computes, and hands the buffer back (`release(j)`). Streamed units go through
`prefetch` device slots in a fixed cyclic order (the order of the forward pass, pass after pass),
so the copy of the next pass's first units starts while this pass ends.

Schedule (g counts streamed units over all passes; slot s = g % slots):
    worker:  wait slot s released by compute of g - slots  ->  [NVMe: read g into staging]
             -> copy to slot s on the copy stream -> record ready(s)
    main:    wait ready(s) -> compute g -> record released(s)
On CUDA the waits between streams are device-side events; host-side flags only make sure an
event is recorded before the other side waits on it. On a CPU-only machine the same worker
thread copies synchronously, standing in for the copy stream, so CI runs this control flow.
"""

from __future__ import annotations

import itertools
import os
import statistics
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from zeroinf.engine.distributed import RankGroup
from zeroinf.engine.gather import host_split, table_name
from zeroinf.engine.plan import STREAMED_TIERS, Plan
from zeroinf.errors import ReadError, ZeroInfError
from zeroinf.format import DTYPES, Checkpoint, UnitEntry, padded_size, partition
from zeroinf.io import PinnedArena, aligned_empty, open_reader
from zeroinf.synthetic import SyntheticCheckpoint

_TICK = itertools.count()
_POLL_S = 0.5  # how often a blocked wait checks whether the other side died
ROWS_BY_CORES = 4 << 20  # gathered rows up to this many bytes: read by the GPU's cores


@dataclass
class Trace:
    """Ordered record of (what, unit index, tick) from both threads, for tests and tracing."""

    events: list[tuple[str, int, int]] = field(default_factory=list)

    def __call__(self, what: str, unit: int) -> None:
        self.events.append((what, unit, next(_TICK)))  # list.append is atomic under the GIL

    def index(self, what: str, unit: int, occurrence: int = 0) -> int:
        hits = [i for i, (w, u, _) in enumerate(self.events) if w == what and u == unit]
        return hits[occurrence] if len(hits) > occurrence else -1


class _Done:
    def wait(self) -> None:
        return None


class _Slot:
    def __init__(self, buf: torch.Tensor, cuda: bool) -> None:
        self.buf = buf
        self.filled = threading.Event()  # set once the copy into buf is issued (CUDA) or done
        self.free = threading.Event()  # set once the compute that used buf is issued or done
        self.free.set()
        self.ready_ev = torch.cuda.Event() if cuda else None
        self.free_ev = torch.cuda.Event() if cuda else None


class Prefetcher:
    def __init__(
        self,
        ckpt: Checkpoint,
        plan: Plan,
        device: torch.device,
        io_backend: str | None = None,
        staging: int = 2,
        trace: Trace | None = None,
        group: RankGroup | None = None,
    ) -> None:
        self.ckpt, self.plan, self.device, self.group = ckpt, plan, device, group
        self.world = group.world if group else 1
        self.units: tuple[UnitEntry, ...] = ckpt.units
        self.cuda = device.type == "cuda"
        self.trace = trace or (lambda what, unit: None)
        self.reader = open_reader(io_backend)
        self.arena: PinnedArena | None = None
        self.resident: dict[int, torch.Tensor] = {}  # unit index -> device buffer
        self.host: dict[int, torch.Tensor] = {}  # unit index -> pinned buffer (CPU/host tier)
        # "host" tier: unit index -> (its table [V, E] in host memory, the unit's layout on the
        # device: its other tensors, packed)
        self.tables: dict[int, torch.Tensor] = {}
        self.device_units: dict[int, UnitEntry] = {}
        self._row_stages: list[tuple[torch.Tensor, Any]] = []  # pinned, for gathered rows
        self._row_next = 0
        self.streamed = [j for j, p in enumerate(plan.placements) if p.tier in STREAMED_TIERS]
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        # CUDA graphs are captured on a stream of their own (engine/graphs.py)
        self.capture_stream = torch.cuda.Stream(device) if self.cuda else None
        self.synthetic = isinstance(ckpt, SyntheticCheckpoint)
        if self.synthetic and any(p.tier == "nvme" for p in plan.placements):
            raise ZeroInfError("a synthetic model has no unit files to stream from NVMe")
        self._error: BaseException | None = None
        self._stop = threading.Event()
        try:
            self._staging = self._make_staging(staging)
            self._load_resident()
            self._load_host_tier()
            padded = padded_size(plan.slot_bytes, self.world) if plan.slots else 0
            self.slots = [
                _Slot(torch.empty(padded, dtype=torch.uint8, device=device), self.cuda)
                for _ in range(plan.slots)
            ]
            # With ranks, this rank's share lands here first and the all-gather fills the slot.
            self._shards = [
                torch.empty(padded // self.world, dtype=torch.uint8, device=device)
                for _ in range(plan.slots if group else 0)
            ]
        except BaseException:
            self.close()
            raise
        self._next = 0  # the main thread's position g in the cyclic streamed order
        self._issued = 0  # units the worker has filled, over all passes
        # set to [] to time copies: (unit, start, share copied, end); with ranks the all-gather
        # runs between the last two events, without ranks they are one event
        self.copy_events: list[tuple[int, Any, Any, Any]] | None = None
        # From pinned memory to a GPU every copy is asynchronous: the main thread issues it in
        # release() and no thread hands work over (a Python thread waking for each copy waits
        # for the GIL, and the link idles meanwhile). NVMe reads block, and a CPU-only run has
        # no copy engine: there a worker thread stands in for the copy stream.
        self.inline = (
            self.cuda
            and all(self.plan.placements[j].tier == "cpu" for j in self.streamed)
            and os.environ.get("ZEROINF_COPY_THREAD") != "1"  # for A/B measurements
        )
        self._worker = threading.Thread(target=self._run, name="zeroinf-prefetch", daemon=True)
        if self.streamed and self.inline:
            for g in range(len(self.slots)):
                self._issue(g, self.host[self.streamed[g % len(self.streamed)]])
        elif self.streamed:
            self._worker.start()

    # ---- set-up: resident units and the CPU tier are read once, through the reader ----

    def _make_staging(self, n: int) -> list[tuple[torch.Tensor, Any]]:
        """Pinned buffers that NVMe reads land in (and that resident units pass through)."""
        need_nvme = any(p.tier == "nvme" for p in self.plan.placements)
        need_gpu_load = self.cuda and any(p.tier == "gpu" for p in self.plan.placements)
        if not (need_nvme or need_gpu_load):
            return []
        size = max(u.nbytes for u in self.units)
        return [
            (aligned_empty(size, pin=self.cuda), torch.cuda.Event() if self.cuda else None)
            for _ in range(n if need_nvme else 1)
        ]

    def _range(self, j: int, sharded: bool) -> tuple[int, int]:
        """(file offset, bytes) of unit j that this rank holds: all of it, or its share."""
        nbytes = self.units[j].nbytes
        if not sharded or self.group is None:
            return 0, nbytes
        start, stop = partition(nbytes, self.group.rank, self.world)
        return start, max(0, min(stop, nbytes) - start)  # the padding past the file is unread

    def _share_bytes(self, j: int) -> int:
        return padded_size(self.units[j].nbytes, self.world) // self.world

    def _read(self, j: int, dest: torch.Tensor, sharded: bool = False) -> Any:
        """Start reading unit j (or this rank's share of it) into dest; returns a handle."""
        u = self.units[j]
        offset, n = self._range(j, sharded)
        if self.synthetic:  # generated, nothing to read
            full = self.ckpt.read_unit(u, torch.empty(u.nbytes, dtype=torch.uint8))
            dest[:n].copy_(full[offset : offset + n])
            return _Done()
        if n == 0:
            return _Done()
        return self.reader.submit(self.ckpt.unit_path(u), offset, dest[:n])

    def _load_resident(self) -> None:
        for j, p in enumerate(self.plan.placements):
            if p.tier != "gpu":
                continue
            nbytes = self.units[j].nbytes
            if not self.cuda:
                buf = aligned_empty(nbytes, pin=False)
                self._read(j, buf).wait()
            else:
                stage, ev = self._staging[0]
                ev.synchronize()  # the previous unit's copy out of the staging buffer is done
                self._read(j, stage).wait()
                buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                buf.copy_(stage[:nbytes], non_blocking=True)
                ev.record()
            self.resident[j] = buf
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _load_host_tier(self) -> None:
        """The CPU tier (each rank its share of every unit) and the "host" tier (whole units
        whose table stays here, the rest copied to the device once)."""
        tiers = {j: p.tier for j, p in enumerate(self.plan.placements) if p.tier in ("cpu", "host")}
        if not tiers:
            return
        sizes = [
            self._share_bytes(j) if t == "cpu" else self.units[j].nbytes for j, t in tiers.items()
        ]
        self.arena = PinnedArena(sizes, pin=self.cuda)
        handles = []
        for (j, tier), size in zip(tiers.items(), sizes, strict=True):
            buf = self.arena.alloc(size)
            self.host[j] = buf
            handles.append(self._read(j, buf, sharded=tier == "cpu"))
        for h in handles:
            h.wait()
        for j in (j for j, t in tiers.items() if t == "host"):
            self._keep_table_on_host(j)

    def _keep_table_on_host(self, j: int) -> None:
        """Unit j's table stays in its host buffer; its other tensors go to the device, packed
        as gather.host_split lays them out."""
        table, dev_unit = host_split(self.units[j], table_name(self.ckpt))
        host = self.host[j]
        rows = host[table.offset : table.offset + table.nbytes].view(DTYPES[table.dtype])
        self.tables[j] = rows.view(table.shape)
        buf = torch.empty(dev_unit.nbytes, dtype=torch.uint8, device=self.device)
        stored = {t.name: t for t in self.units[j].tensors}  # where each is in the unit's bytes
        for t in dev_unit.tensors:
            src = stored[t.name]
            buf[t.offset : t.offset + t.nbytes].copy_(host[src.offset : src.offset + src.nbytes])
        self.resident[j] = buf
        self.device_units[j] = dev_unit

    def gather_rows(
        self, j: int, ids: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rows of unit j's host-kept table for ids [B, S] -> [B, S, E] on the device (into
        `out` when given): gathered on the host into pinned staging, then one copy on the
        current stream. Reading the ids waits for them (in decode: the last step's sampling).
        Up to ROWS_BY_CORES bytes (a decode step's rows) the GPU's cores read the staging
        (kernels.copy_from_pinned): on the copy engine the copy waited behind the next step's
        first unit copies, which start as the last step ends (47 ms a step for OPT-30B's host
        KV tier, whose GPU and CPU both idled meanwhile; docs/benchmarks.md). A prefill
        chunk's rows (tens of MB) take the engine, whose rate they need."""
        table = self.tables[j]  # [V, E]
        flat = ids.reshape(-1).cpu()
        n, width = flat.numel(), table.shape[1]
        nbytes = n * width * table.element_size()
        stage = self._row_stage(nbytes)
        rows = stage[0][:nbytes].view(table.dtype).view(n, width)
        torch.index_select(table, 0, flat, out=rows)
        if out is None:
            out = torch.empty(*ids.shape, width, dtype=table.dtype, device=self.device)
        if self.cuda and nbytes <= ROWS_BY_CORES:
            from kernels import copy_from_pinned

            copy_from_pinned(rows, out.view(n, width))
        else:
            out.view(n, width).copy_(rows, non_blocking=self.cuda)
        if stage[1] is not None:
            stage[1].record()  # the staging buffer is reused once this copy has finished
        return out

    def _row_stage(self, nbytes: int) -> tuple[torch.Tensor, Any]:
        """The next of two pinned staging buffers for gathered rows, at least nbytes, once
        its previous copy to the device has finished."""
        if not self._row_stages:
            self._row_stages = [(torch.empty(0, dtype=torch.uint8), None)] * 2
        k = self._row_next % 2
        self._row_next += 1
        buf, ev = self._row_stages[k]
        if ev is not None:
            ev.synchronize()
        if buf.numel() < nbytes:
            buf = aligned_empty(nbytes, pin=self.cuda)
            ev = torch.cuda.Event() if self.cuda else None
            self._row_stages[k] = (buf, ev)
        return buf, ev

    # ---- the copy side (worker thread) ----

    def _run(self) -> None:
        with torch.inference_mode():  # buffers may be inference tensors (made under it)
            self._run_copies()

    def _run_copies(self) -> None:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            reads: dict[int, Any] = {}  # g -> pending NVMe read handle
            for g in itertools.count():
                j = self.streamed[g % len(self.streamed)]
                if self.plan.placements[j].tier == "nvme":
                    src = self._nvme_source(g, reads)
                else:
                    src = self.host[j]
                if not self._wait(self.slots[g % len(self.slots)].free):
                    return
                self._issue(g, src)
        except BaseException as e:  # surfaced to the main thread by acquire()
            self._error = e

    def _issue(self, g: int, src: torch.Tensor) -> None:
        """Copy streamed unit g (cyclic order) from host bytes `src` into its slot, which the
        compute of unit g - slots has released (on CUDA: once that compute finishes)."""
        j = self.streamed[g % len(self.streamed)]
        slot = self.slots[g % len(self.slots)]
        slot.free.clear()
        self.trace("copy_start", j)
        shard = self._shards[g % len(self.slots)] if self.group else None
        if self.cuda:
            self.copy_stream.wait_event(slot.free_ev)
            timing = self._copy_timing()
            with torch.cuda.stream(self.copy_stream):
                self._fill(j, slot.buf, src, shard, non_blocking=True,
                           copied=timing[1] if timing else None)  # fmt: skip
            slot.ready_ev.record(self.copy_stream)
            if timing is not None:
                timing[2].record(self.copy_stream)
                self.copy_events.append((j, *timing))
            if self.plan.placements[j].tier == "nvme":
                self._staging[g % len(self._staging)][1].record(self.copy_stream)
        else:
            self._fill(j, slot.buf, src, shard, non_blocking=False)
        self.trace("copy_done", j)
        self._issued += 1
        slot.filled.set()

    def _copy_timing(self) -> tuple[torch.cuda.Event, ...] | None:
        """Start, share-copied and end events of one unit's fill, when copy timing is on
        (zeroinf-bench --trace); the start is recorded now."""
        if self.copy_events is None:
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record(self.copy_stream)
        return start, torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def copy_profile(self) -> dict[str, float]:
        """From the timed copies: bytes/s while copying, and the share of the span spent copying
        (1.0: the link never idled between the first copy's start and the last copy's end).
        With ranks a fill is this rank's share over its link, then the all-gather: its H2D
        rate counts the share's bytes over the copy alone, and the all-gather's time per unit
        is given apart."""
        ev = self.copy_events or []
        if not ev:
            return {}
        torch.cuda.synchronize(self.device)
        busy = sum(a.elapsed_time(c) for _, a, _, c in ev) / 1e3
        span = ev[0][1].elapsed_time(ev[-1][3]) / 1e3
        nbytes = sum(self._share_bytes(j) if self.group else self.units[j].nbytes for j, *_ in ev)
        # idle link time before each copy after the first pass (decode), summed per unit
        n = len(self.streamed)
        idle: dict[int, float] = {}
        for k in range(n + 1, len(ev)):
            j = ev[k][0]
            idle[j] = idle.get(j, 0.0) + ev[k - 1][3].elapsed_time(ev[k][1]) / 1e3
        worst = sorted(idle.items(), key=lambda kv: -kv[1])[:4]
        out: dict[str, Any] = {
            "copies": len(ev),
            "copy_bytes_per_s": nbytes / busy,
            "decode_copy_bytes_per_s_p10_p50_p90": [],
            "decode_slowest_units": {},
            "busy_fraction": busy / span,
            "decode_idle_s": sum(idle.values()),
            "decode_idle_before": {self.units[j].name: round(t, 4) for j, t in worst},
        }
        if not self.group:
            # each decode copy's own rate: is the link slow throughout, or are some copies slow
            # (and which units' copies: the median rate per unit, the slowest three)?
            per_unit: dict[int, list[float]] = {}
            for j, a, _, c in ev[n:]:
                rate = self.units[j].nbytes / (a.elapsed_time(c) / 1e3)
                per_unit.setdefault(j, []).append(rate)
            rates = sorted(r for rs in per_unit.values() for r in rs)
            if rates:
                out["decode_copy_bytes_per_s_p10_p50_p90"] = [
                    rates[int(q * (len(rates) - 1))] for q in (0.1, 0.5, 0.9)
                ]
            by_unit = sorted((statistics.median(rs), j) for j, rs in per_unit.items())[:3]
            slowest = {self.units[j].name: round(r / 1e9, 1) for r, j in by_unit}
            out["decode_slowest_units"] = slowest
        else:
            h2d = sum(a.elapsed_time(b) for _, a, b, _ in ev) / 1e3
            gather = [b.elapsed_time(c) / 1e3 for _, _, b, c in ev]
            out["h2d_bytes_per_s"] = nbytes / h2d
            out["gather_s_per_unit"] = sum(gather) / len(gather)
            out["gather_s_max"] = max(gather)
        return out

    def _fill(
        self,
        j: int,
        dst: torch.Tensor,
        src: torch.Tensor,
        shard: torch.Tensor | None,
        non_blocking: bool,
        copied: torch.cuda.Event | None = None,
    ) -> None:
        """Host bytes of unit j -> device slot: one copy, or the rank's share then all-gather.
        `copied` (timing only) is recorded on the current stream once the host bytes are in."""
        if shard is None:
            n = self.units[j].nbytes
            dst[:n].copy_(src[:n], non_blocking=non_blocking)
            if copied is not None:
                copied.record()
            return
        share = self._share_bytes(j)
        shard[:share].copy_(src[:share], non_blocking=non_blocking)
        if copied is not None:
            copied.record()
        dist.all_gather_into_tensor(
            dst[: share * self.world], shard[:share], group=self.group.gather
        )

    def _nvme_source(self, g: int, reads: dict[int, Any]) -> torch.Tensor:
        """Wait for the read of streamed unit g into its staging buffer, keeping the reads of the
        following units in flight (read-ahead beyond the device slots)."""
        nstage = len(self._staging)
        for g2 in range(g, g + nstage):
            j2 = self.streamed[g2 % len(self.streamed)]
            if g2 in reads or self.plan.placements[j2].tier != "nvme":
                continue
            stage, ev = self._staging[g2 % nstage]
            if ev is not None:
                ev.synchronize()  # staging buffer's last copy to the device has finished
            self.trace("read_start", j2)
            reads[g2] = self._read(j2, stage, sharded=True)
        reads.pop(g).wait()
        self.trace("read_done", self.streamed[g % len(self.streamed)])
        return self._staging[g % nstage][0]

    def _wait(self, flag: threading.Event) -> bool:
        while not flag.wait(_POLL_S):
            if self._stop.is_set():
                return False
        return not self._stop.is_set()

    # ---- the compute side (main thread) ----

    def acquire(self, j: int) -> torch.Tensor:
        """Unit j's bytes on the device (uint8, >= unit nbytes). Compute may be issued at once:
        on CUDA the current stream waits for the copy on the device."""
        if self._error is not None:  # a failed read leaves the cyclic order mid-pass: say so
            raise self._failure()
        if j in self.resident:
            return self.resident[j]
        expect = self.streamed[self._next % len(self.streamed)]
        if j != expect:
            raise ZeroInfError(f"prefetcher: unit {j} requested, but {expect} is next in order")
        slot = self.slots[self._next % len(self.slots)]
        while not slot.filled.wait(_POLL_S):
            if self._error is not None or self.inline or not self._worker.is_alive():
                raise self._failure()
        slot.filled.clear()
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready_ev)
        self.trace("compute_start", j)
        return slot.buf

    def release(self, j: int) -> None:
        """Compute that reads unit j's buffer has been issued: its slot may be refilled once
        that compute finishes."""
        if j in self.resident:
            return
        slot = self.slots[self._next % len(self.slots)]
        self._next += 1
        if self.cuda:
            slot.free_ev.record(torch.cuda.current_stream(self.device))
        self.trace("compute_done", j)
        slot.free.set()
        if self.inline:  # refill this slot with the unit `slots` positions ahead
            g = self._next + len(self.slots) - 1
            self._issue(g, self.host[self.streamed[g % len(self.streamed)]])

    def _failure(self) -> BaseException:
        e = self._error
        if isinstance(e, ZeroInfError):
            return e
        return ReadError(f"prefetch worker failed: {e!r}") if e else ReadError("prefetch stopped")

    @property
    def host_bytes(self) -> int:
        """Host memory for streaming: the CPU tier's arena plus the staging ring."""
        staging = sum(s.numel() for s, _ in self._staging + self._row_stages)
        return (self.arena.nbytes if self.arena else 0) + staging

    @property
    def pinned_bytes(self) -> int:
        return self.host_bytes if self.cuda else 0

    def close(self) -> None:
        worker = getattr(self, "_worker", None)
        if self.group is not None and worker is not None:
            # Every rank's worker must issue the same collectives: let it fill the slots that
            # the last pass freed (it always does, on every rank) before stopping it.
            target = self._next + len(self.slots)
            while self._issued < target and worker.is_alive() and self._error is None:
                worker.join(timeout=0.01)
        self._stop.set()
        if worker is not None and worker.is_alive():
            worker.join(timeout=10)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.slots = []
        self.resident.clear()
        self.host.clear()
        self.tables.clear()
        self._row_stages = []
        if self.arena is not None:
            self.arena.close()
            self.arena = None
        self._staging = []
        self.reader.close()
