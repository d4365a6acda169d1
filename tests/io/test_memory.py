"""aligned_empty and PinnedArena: alignment, sizes, disjoint slots; reads land in them."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
from io_helpers import TIMEOUT

from zeroinf.io import PinnedArena, aligned_empty, open_reader
from zeroinf.io.memory import _pack, huge_page_share

PAGE = 4096


@pytest.mark.parametrize("nbytes", [0, 1, PAGE - 1, PAGE, 3 * PAGE + 5, 5 << 20])
@pytest.mark.parametrize("pin", [False, True])
def test_aligned_empty(nbytes, pin):
    t = aligned_empty(nbytes, pin=pin)
    assert t.dtype == torch.uint8 and t.numel() == nbytes and t.is_contiguous()
    assert t.data_ptr() % PAGE == 0
    t.fill_(7)  # the memory is really there
    assert int(t.sum()) == 7 * nbytes
    if pin and torch.cuda.is_available():
        assert t.is_pinned()


def test_buffer_outlives_its_first_tensor():
    view = aligned_empty(2 * PAGE)[PAGE:]
    view.fill_(3)  # the slice alone keeps the mapping alive
    assert int(view.sum()) == 3 * PAGE


def test_pack():
    assert _pack([600, 600, 300], 1000) == [600, 900]
    assert _pack([1500, 100, 100], 1000) == [1500, 200]
    assert _pack([], 1000) == []


def test_arena_from_sizes():
    sizes = [3 * PAGE + 1, 10, 2 * PAGE, 7 * PAGE]
    with PinnedArena(sizes, pin=True, chunk_bytes=8 * PAGE) as arena:
        assert arena.nbytes == (4 + 1 + 2 + 7) * PAGE
        slots = [arena.alloc(n) for n in sizes]
        assert arena.free_bytes == 0
        spans = sorted((s.data_ptr(), s.data_ptr() + s.numel()) for s in slots)
        assert all(a % PAGE == 0 for a, _ in spans)
        assert all(end <= nxt for (_, end), (nxt, _) in pairwise(spans))  # disjoint
        assert [s.numel() for s in slots] == sizes
        with pytest.raises(MemoryError, match="no room"):
            arena.alloc(1)


def test_arena_from_total():
    arena = PinnedArena(10 * PAGE + 1, pin=False, chunk_bytes=4 * PAGE)
    assert arena.nbytes == 11 * PAGE and not arena.pinned
    assert arena.alloc(4 * PAGE).numel() == 4 * PAGE
    assert arena.alloc(3 * PAGE).data_ptr() % PAGE == 0
    with pytest.raises(MemoryError):
        arena.alloc(5 * PAGE)  # larger than any chunk
    arena.close()
    assert arena.nbytes == 0


def test_reads_into_arena_slots(backend, make_file):
    path, data = make_file(12 * PAGE)
    with PinnedArena([4 * PAGE] * 3, pin=True, chunk_bytes=8 * PAGE) as arena:
        slots = [arena.alloc(4 * PAGE) for _ in range(3)]
        with open_reader(backend) as r:
            handles = [r.submit(path, i * 4 * PAGE, s) for i, s in enumerate(slots)]
            for h in handles:
                h.wait(TIMEOUT)
        assert b"".join(s.numpy().tobytes() for s in slots) == data


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvme_to_pinned_to_gpu(backend, make_file):
    path, data = make_file(64 * PAGE)
    with PinnedArena([32 * PAGE] * 2, pin=True) as arena, open_reader(backend) as r:
        assert arena.pinned
        stream = torch.cuda.Stream()
        out = torch.empty(64 * PAGE, dtype=torch.uint8, device="cuda")
        for i in range(2):
            slot = arena.alloc(32 * PAGE)
            assert slot.is_pinned()
            r.submit(path, i * 32 * PAGE, slot).wait(TIMEOUT)
            with torch.cuda.stream(stream):
                out[i * 32 * PAGE : (i + 1) * 32 * PAGE].copy_(slot, non_blocking=True)
        stream.synchronize()
    assert out.cpu().numpy().tobytes() == data


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs /proc/self/smaps")
def test_huge_page_share_reads_the_tensors_own_mapping() -> None:
    """Against the kernel's own count for the mapping: a 64 MiB aligned_empty buffer, touched,
    is all resident; its huge-page share is AnonHugePages / Rss of that mapping, which THP's
    setting decides (0 with "never"); no tensor, no share."""
    buf = aligned_empty(64 << 20).zero_()
    share = huge_page_share([buf])
    assert share is not None and 0 <= share <= 1
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    if "[never]" in mode:
        assert share == 0
    if "[madvise]" in mode:  # only what asked for them: not the heap's mapping of a small tensor
        assert huge_page_share([torch.ones(1000)]) == 0
    assert huge_page_share([]) is None
