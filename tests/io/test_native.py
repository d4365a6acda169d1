"""The C module itself: short-read resubmission, timeouts, errors with errno and offset."""

from __future__ import annotations

import errno
import time

import pytest
from io_helpers import TIMEOUT

from zeroinf.io import aligned_empty

native = pytest.importorskip("zeroinf._native_aio")
PAGE = 4096


def test_short_reads_are_resubmitted(make_file):
    path, data = make_file(3 << 20)
    r = native.Reader(4, 1 << 20, test_short_reads=True)  # every block first comes back half
    fd = r.open(str(path), True)
    dest = aligned_empty(len(data))
    assert r.wait(r.submit(fd, 0, len(data), dest.data_ptr()), TIMEOUT) is True
    assert dest.numpy().tobytes() == data
    r.close()


def test_errors_carry_errno_file_and_offset(make_file):
    path, _ = make_file(4 * PAGE)
    r = native.Reader(2, PAGE)
    fd = r.open(str(path), True)
    dest = aligned_empty(8 * PAGE)
    rid = r.submit(fd, 100, PAGE, dest.data_ptr(), str(path))  # misaligned for O_DIRECT
    with pytest.raises(OSError) as e:
        r.wait(rid, TIMEOUT)
    assert e.value.errno == errno.EINVAL and e.value.offset == 100 and e.value.where == str(path)
    rid = r.submit(fd, 2 * PAGE, 8 * PAGE, dest.data_ptr(), str(path))
    with pytest.raises(EOFError) as e:
        r.wait(rid, TIMEOUT)
    assert e.value.offset == 4 * PAGE and e.value.nread == 2 * PAGE
    with pytest.raises(KeyError):
        r.wait(rid)  # consumed
    with pytest.raises(OSError):
        r.submit(12345, 0, PAGE, dest.data_ptr())  # bad fd
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.submit(fd, 0, PAGE, dest.data_ptr())


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_size"):
        native.Reader(4, 1000)
    with pytest.raises(ValueError, match="queue_depth"):
        native.Reader(0, PAGE)


def test_wait_timeout_and_done(make_file):
    path, data = make_file(8 << 20)
    r = native.Reader(1, PAGE)  # one page at a time: slow enough to catch in flight
    fd = r.open(str(path), False)
    dest = aligned_empty(len(data))
    rid = r.submit(fd, 0, len(data), dest.data_ptr())
    r.wait(rid, 0.0)  # a zero timeout polls (True or False), never blocks
    deadline = time.monotonic() + TIMEOUT
    while not r.done(rid) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert r.done(rid) and r.wait(rid, TIMEOUT) is True
    assert dest.numpy().tobytes() == data
    r.close()
