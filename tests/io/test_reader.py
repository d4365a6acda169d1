"""Every backend reads exactly the file's bytes; bad requests and bad files fail clearly."""

from __future__ import annotations

import os
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_helpers import TIMEOUT

from zeroinf.errors import ReadError
from zeroinf.io import RequestError, aligned_empty, open_reader

PAGE = 4096


def test_whole_file_in_many_blocks(backend, make_file):
    path, data = make_file(5 * (1 << 20) + 3 * PAGE)  # 5 MiB + 3 pages: a partial last block
    with open_reader(backend, queue_depth=4, block_size=64 << 10) as r:
        assert r.name == backend
        dest = aligned_empty(len(data))
        r.submit(path, 0, dest).wait(TIMEOUT)
        assert dest.numpy().tobytes() == data


def test_many_requests_in_flight(backend, make_file):
    path, data = make_file(256 * PAGE)
    rng = random.Random(7)
    with open_reader(backend, queue_depth=8, block_size=4 * PAGE) as r:
        reqs = []
        for _ in range(64):
            start = rng.randrange(256) * PAGE
            n = rng.randrange(1, 256 - start // PAGE + 1) * PAGE
            dest = aligned_empty(n)
            reqs.append((start, dest, r.submit(str(path), start, dest)))
        for start, dest, h in reversed(reqs):  # completion per request, in any order
            h.wait(TIMEOUT)
            assert h.done()
            assert dest.numpy().tobytes() == data[start : start + dest.numel()]


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ranges=st.lists(st.tuples(st.integers(0, 95), st.integers(0, 40)), min_size=1, max_size=12),
    queue_depth=st.sampled_from([1, 3, 32]),
    block_pages=st.sampled_from([1, 5, 256]),
)
def test_random_aligned_ranges(backend, make_file, ranges, queue_depth, block_pages):
    path, data = make_file(96 * PAGE)
    with open_reader(backend, queue_depth, block_pages * PAGE) as r:
        reads = []
        for first, npages in ranges:
            npages = min(npages, 96 - first)  # stay inside the file
            dest = aligned_empty(npages * PAGE)
            reads.append((first * PAGE, dest, r.submit(path, first * PAGE, dest)))
        for start, dest, h in reads:
            h.wait(TIMEOUT)
            assert dest.numpy().tobytes() == data[start : start + dest.numel()]


def test_unaligned_requests_are_refused(backend, make_file):
    import torch

    path, _ = make_file(4 * PAGE)
    buf = aligned_empty(3 * PAGE)
    bad = {
        "offset": (100, buf[:PAGE]),
        "aligned": (0, buf[1 : PAGE + 1]),
        "multiple": (0, buf[:1000]),
        "uint8": (0, buf.view(torch.int32)),
    }
    with open_reader(backend) as r:
        for what, (offset, dest) in bad.items():
            with pytest.raises(RequestError, match=what) as e:
                r.submit(path, offset, dest)
            assert str(path) in str(e.value) and f"offset {offset}" in str(e.value)
            assert isinstance(e.value, ValueError) and isinstance(e.value, ReadError)


@pytest.mark.parametrize("size", [2 * PAGE, 2 * PAGE + 100])
def test_truncated_file_names_file_and_offset(backend, make_file, size):
    path, data = make_file(size)
    with open_reader(backend, queue_depth=2, block_size=PAGE) as r:
        dest = aligned_empty(4 * PAGE)
        with pytest.raises(ReadError, match="end of file") as e:
            r.submit(path, 0, dest).wait(TIMEOUT)
        assert str(path) in str(e.value)
        assert f"failed at offset {size}" in str(e.value)
        assert e.value.offset == size and e.value.path == str(path)
        # the bytes before the cut arrived; a read inside the file still works afterwards
        assert dest[: 2 * PAGE].numpy().tobytes() == data[: 2 * PAGE]
        ok = aligned_empty(PAGE)
        r.submit(path, PAGE, ok).wait(TIMEOUT)
        assert ok.numpy().tobytes() == data[PAGE : 2 * PAGE]


def test_missing_file(backend, tmp_path):
    with open_reader(backend) as r, pytest.raises(ReadError, match="cannot open"):
        r.submit(tmp_path / "nope.bin", 0, aligned_empty(PAGE))


def test_empty_read_is_done_at_once(backend, make_file):
    path, _ = make_file(PAGE)
    with open_reader(backend) as r:
        h = r.submit(path, 0, aligned_empty(0))
        assert h.done()
        h.wait(TIMEOUT)


def test_files_are_opened_once(backend, make_file, monkeypatch):
    path, data = make_file(8 * PAGE)
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a: opened.append(p) or real_open(p, *a))
    with open_reader(backend) as r:
        dests = [aligned_empty(PAGE) for _ in range(8)]
        handles = [r.submit(path, i * PAGE, d) for i, d in enumerate(dests)]
        for h in handles:
            h.wait(TIMEOUT)
    assert opened == [str(path)]
    assert b"".join(d.numpy().tobytes() for d in dests) == data


def test_threads_share_a_reader(backend, make_file):
    path, data = make_file(64 * PAGE)
    errors = []

    def worker(seed: int) -> None:
        try:
            for i in range(20):
                start = (seed * 7 + i * 3) % 60 * PAGE
                dest = aligned_empty(4 * PAGE)
                r.submit(path, start, dest).wait(TIMEOUT)
                assert dest.numpy().tobytes() == data[start : start + 4 * PAGE]
        except BaseException as e:
            errors.append(e)

    with open_reader(backend, queue_depth=4, block_size=PAGE) as r:
        threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
    assert not errors


def test_close_with_reads_in_flight(backend, make_file):
    path, data = make_file(1 << 20)
    r = open_reader(backend, queue_depth=2, block_size=PAGE)
    dests = [aligned_empty(1 << 20) for _ in range(4)]
    for d in dests:
        r.submit(path, 0, d)  # never waited for: close() waits for them
    r.close()
    assert all(d.numpy().tobytes() == data for d in dests)
    with pytest.raises(ValueError, match="closed"):
        r.submit(path, 0, dests[0])
    r.close()  # twice is fine


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_ranges_rebuild_the_padded_unit(backend, make_file, world):
    from zeroinf.format import padded_size, partition

    path, data = make_file(5 * PAGE)
    padded = data + bytes(padded_size(len(data), world) - len(data))
    with open_reader(backend) as r:
        parts = []
        for rank in range(world):
            start, stop = partition(len(data), rank, world)
            dest = aligned_empty(stop - start)
            dest.fill_(0xAB)  # the padding must be overwritten with zeros
            r.submit_padded(path, start, dest, len(data)).wait(TIMEOUT)
            parts.append(dest.numpy().tobytes())
    assert b"".join(parts) == padded
