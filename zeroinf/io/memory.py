"""Host buffers that O_DIRECT can read into and the GPU can copy from at full PCIe speed.

Memory comes from anonymous mmap: page-aligned (so 4096-aligned) by construction, and not from
torch's pinned caching allocator, which rounds every request up to a power of two (a 5 GiB
arena would take 8). Pinning registers the pages with CUDA (cudaHostRegister); when the last
tensor viewing a buffer dies, the buffer unregisters itself and unmaps. Without CUDA, or with
pin=False, the same code runs on plain memory, so CI exercises it.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import mmap
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from zeroinf.sizes import ALIGN, align_up, fmt_bytes

logger = logging.getLogger("zeroinf")
_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, as torch itself does


class _HostBuffer(mmap.mmap):
    """Anonymous mapping that unpins itself before it is unmapped."""

    pinned_addr = 0

    def pin(self, addr: int, nbytes: int) -> None:
        err = int(torch.cuda.cudart().cudaHostRegister(addr, nbytes, _CUDA_HOST_REGISTER_PORTABLE))
        if err:
            raise RuntimeError(f"cudaHostRegister of {fmt_bytes(nbytes)} failed: cudaError {err}")
        self.pinned_addr = addr

    def __del__(self) -> None:
        if self.pinned_addr:
            try:
                torch.cuda.cudart().cudaHostUnregister(self.pinned_addr)
            except Exception:  # interpreter shutdown: the process is ending anyway
                pass
            self.pinned_addr = 0


def _can_pin(pin: bool) -> bool:
    return pin and torch.cuda.is_available()


def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
    """Uninitialised uint8 tensor of `nbytes` with a 4096-aligned data_ptr; page-locked for
    CUDA when `pin` and CUDA is available, plain memory otherwise."""
    if nbytes < 0:
        raise ValueError(f"aligned_empty: negative size {nbytes}")
    size = max(align_up(nbytes), ALIGN)
    buf = _HostBuffer(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if size >= 2 << 20 and hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)  # fewer pages to fault in and to pin
    whole = torch.frombuffer(buf, dtype=torch.uint8)  # the tensor's storage keeps buf alive
    if _can_pin(pin):
        buf.pin(whole.data_ptr(), size)
    return whole[:nbytes]


def huge_page_share(tensors: Iterable[torch.Tensor]) -> float | None:
    """The share of the resident bytes of the memory mappings holding these host tensors that
    transparent huge pages back (/proc/self/smaps: AnonHugePages / Rss; None where there is no
    such file or no tensor). The kernel merges adjacent anonymous mappings of equal flags, so a
    mapping may hold more than these tensors. THP in "madvise" mode (aligned_empty asks for it)
    gives huge pages only where the kernel finds free 2 MiB blocks at the first touch, which a
    nearly full host may not have."""
    try:
        text = Path("/proc/self/smaps").read_text()
    except OSError:
        return None
    spans: dict[tuple[int, int], dict[str, int]] = {}  # (start, end) -> Rss, AnonHugePages
    fields: dict[str, int] = {}
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0]
        if not head.endswith(":"):  # "start-end perms offset dev inode path": a new mapping
            lo, hi = head.split("-")
            fields = spans.setdefault((int(lo, 16), int(hi, 16)), {})
        elif head in ("Rss:", "AnonHugePages:"):
            fields[head] = int(line.split()[1]) * 1024
    held = {span for t in tensors for span in spans if span[0] <= t.data_ptr() < span[1]}
    rss = sum(spans[span].get("Rss:", 0) for span in held)
    return sum(spans[span].get("AnonHugePages:", 0) for span in held) / rss if rss else None


class PinnedArena:
    """Pinned host memory for the CPU tier: a few large chunks, allocated and pinned in parallel
    threads once (pinning costs ~0.6 s per GiB), carved into 4096-aligned slots by alloc().

    `sizes` lists the slots to come (in the order they will be allocated): chunks are packed
    from them so that nothing is wasted. An int asks for that many bytes in chunk_bytes chunks.
    """

    def __init__(
        self,
        sizes: Sequence[int] | int,
        pin: bool = True,
        chunk_bytes: int = 1 << 30,
        threads: int | None = None,
    ) -> None:
        if chunk_bytes <= 0 or chunk_bytes % ALIGN:
            raise ValueError(f"chunk_bytes {chunk_bytes} must be a positive multiple of {ALIGN}")
        if isinstance(sizes, int):
            total = align_up(sizes)
            plan = [min(chunk_bytes, total - s) for s in range(0, total, chunk_bytes)]
        else:
            plan = _pack([align_up(s) for s in sizes], chunk_bytes)
        self.pinned = _can_pin(pin)
        t0 = time.perf_counter()
        workers = max(1, min(len(plan), threads or os.cpu_count() or 1))
        with cf.ThreadPoolExecutor(workers, thread_name_prefix="zeroinf-pin") as pool:
            self._chunks = list(pool.map(lambda n: aligned_empty(n, pin), plan))
        self._used = [0] * len(self._chunks)
        if self._chunks:
            logger.info(
                "%s %s host memory in %d chunks in %.2f s",
                "pinned" if self.pinned else "allocated",
                fmt_bytes(self.nbytes),
                len(self._chunks),
                time.perf_counter() - t0,
            )

    @property
    def nbytes(self) -> int:
        """Bytes held (page-locked when self.pinned)."""
        return sum(c.numel() for c in self._chunks)

    @property
    def free_bytes(self) -> int:
        return self.nbytes - sum(self._used)

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A slot of `nbytes` (uint8, 4096-aligned data_ptr), first fit over the chunks."""
        need = align_up(nbytes)
        if need == 0:
            return aligned_empty(0)
        for i, chunk in enumerate(self._chunks):
            if self._used[i] + need <= chunk.numel():
                start = self._used[i]
                self._used[i] += need
                return chunk[start : start + nbytes]
        raise MemoryError(
            f"PinnedArena: no room for {fmt_bytes(nbytes)} "
            f"({fmt_bytes(self.free_bytes)} free in {len(self._chunks)} chunks)"
        )

    def close(self) -> None:
        """Drop the arena's chunks: each is unpinned and unmapped once no slot views it."""
        self._chunks, self._used = [], []

    def __enter__(self) -> PinnedArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pack(slots: list[int], chunk_bytes: int) -> list[int]:
    """Chunk sizes holding `slots` in order, each chunk at most max(chunk_bytes, its largest
    slot): allocating the slots in the same order then fills every chunk exactly."""
    chunks: list[int] = []
    for s in slots:
        if chunks and chunks[-1] + s <= chunk_bytes:
            chunks[-1] += s
        else:
            chunks.append(s)
    return [c for c in chunks if c]
