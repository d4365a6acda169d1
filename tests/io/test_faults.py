"""Injected errors, truncations and delays surface as ReadError / TimeoutError, never a hang."""

from __future__ import annotations

import errno

import pytest
from io_helpers import TIMEOUT

from zeroinf.errors import ReadError
from zeroinf.io import FaultyReader, aligned_empty, open_reader

PAGE = 4096


def test_injected_eio_names_file_and_offset(backend, make_file):
    path, data = make_file(16 * PAGE)
    with FaultyReader(open_reader(backend), fail_at={(path, 5 * PAGE): errno.EIO}) as r:
        bad, good = aligned_empty(8 * PAGE), aligned_empty(8 * PAGE)
        h_bad = r.submit(path, 0, bad)
        h_good = r.submit(path, 8 * PAGE, good)  # in flight alongside, unaffected
        with pytest.raises(ReadError) as e:
            h_bad.wait(TIMEOUT)
        msg = str(e.value)
        assert str(path) in msg and f"failed at offset {5 * PAGE}" in msg
        assert "Input/output error" in msg and e.value.errno == errno.EIO
        h_good.wait(TIMEOUT)
        assert good.numpy().tobytes() == data[8 * PAGE :]
        with pytest.raises(ReadError):  # waiting again reports the same failure
            h_bad.wait(TIMEOUT)
        assert r.submitted == [(str(path), 0, 8 * PAGE), (str(path), 8 * PAGE, 8 * PAGE)]


def test_offset_and_path_keys(backend, make_file):
    path, _ = make_file(8 * PAGE)
    other, _ = make_file(4 * PAGE)
    with FaultyReader(open_reader(backend), fail_at={3 * PAGE: errno.ENOSPC, other: 5}) as r:
        ok = r.submit(path, 0, aligned_empty(3 * PAGE))  # ends before the faulty offset
        ok.wait(TIMEOUT)
        with pytest.raises(ReadError, match=f"failed at offset {3 * PAGE}"):
            r.submit(path, 2 * PAGE, aligned_empty(2 * PAGE)).wait(TIMEOUT)
        with pytest.raises(ReadError, match=f"{other}.*offset {PAGE}: Input/output"):
            r.submit(other, PAGE, aligned_empty(PAGE)).wait(TIMEOUT)


def test_short_read_reads_what_comes_before(backend, make_file):
    path, data = make_file(8 * PAGE)
    with FaultyReader(open_reader(backend), short_at=[6 * PAGE]) as r:
        dest = aligned_empty(8 * PAGE)
        with pytest.raises(ReadError, match=f"failed at offset {6 * PAGE}: unexpected end"):
            r.submit(path, 0, dest).wait(TIMEOUT)
        assert dest[: 6 * PAGE].numpy().tobytes() == data[: 6 * PAGE]


def test_delay_is_visible_and_bounded(backend, make_file):
    path, data = make_file(2 * PAGE)
    with FaultyReader(open_reader(backend), delay={path: 0.3}) as r:
        dest = aligned_empty(2 * PAGE)
        h = r.submit(path, 0, dest)
        assert not h.done()
        with pytest.raises(TimeoutError):
            h.wait(0.01)
        h.wait(TIMEOUT)
        assert h.done() and dest.numpy().tobytes() == data


def test_unaligned_request_still_refused(backend, make_file):
    path, _ = make_file(PAGE)
    with FaultyReader(open_reader(backend)) as r, pytest.raises(ValueError, match="offset"):
        r.submit(path, 1, aligned_empty(PAGE))
