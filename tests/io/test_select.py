"""Backend choice: argument > ZEROINF_IO_BACKEND > auto (native -> libaio -> threadpool),
logged once; a missing native module falls back, loudly, and reads stay correct."""

from __future__ import annotations

import errno
import logging
import os
import sys

import pytest
from io_helpers import TIMEOUT, backend_available

import zeroinf.io.reader as reader_mod
from zeroinf.errors import ConfigError
from zeroinf.io import BACKENDS, ENV_BACKEND, aligned_empty, open_reader

PAGE = 4096


@pytest.fixture(autouse=True)
def fresh_log(monkeypatch):
    monkeypatch.setattr(reader_mod, "_announced", set())
    monkeypatch.delenv(ENV_BACKEND, raising=False)


def _read_ok(r, path, data) -> None:
    dest = aligned_empty(len(data))
    r.submit(path, 0, dest).wait(TIMEOUT)
    assert dest.numpy().tobytes() == data


def test_auto_takes_the_first_available(caplog):
    caplog.set_level(logging.INFO, logger="zeroinf")
    with open_reader() as r:
        assert r.name == next(b for b in BACKENDS if backend_available(b))
    with open_reader():
        pass
    chosen = [rec for rec in caplog.records if "io backend" in rec.getMessage()]
    assert len(chosen) == 1  # once per process, not once per reader


def test_without_native_module(monkeypatch, caplog, make_file):
    path, data = make_file(4 * PAGE)
    monkeypatch.setitem(sys.modules, "zeroinf._native_aio", None)  # as if never compiled
    with caplog.at_level(logging.WARNING, logger="zeroinf"), open_reader() as r:
        assert r.name == ("libaio" if backend_available("libaio") else "threadpool")
        _read_ok(r, path, data)
    assert "native: zeroinf._native_aio is not built" in caplog.text
    with pytest.raises(ConfigError, match="'native' .* cannot run"):
        open_reader("native")


def test_without_native_or_libaio(monkeypatch, caplog, make_file):
    path, data = make_file(4 * PAGE)
    monkeypatch.setitem(sys.modules, "zeroinf._native_aio", None)
    monkeypatch.setitem(sys.modules, "libaio", None)
    with caplog.at_level(logging.WARNING, logger="zeroinf"), open_reader() as r:
        assert r.name == "threadpool"
        _read_ok(r, path, data)
    assert "native:" in caplog.text and "libaio:" in caplog.text


def test_environment_then_argument(monkeypatch):
    monkeypatch.setenv(ENV_BACKEND, "threadpool")
    with open_reader() as r:
        assert r.name == "threadpool"
    if backend_available("native"):
        with open_reader("native") as r:  # the argument wins
            assert r.name == "native"
    monkeypatch.setenv(ENV_BACKEND, "fastest")
    with pytest.raises(ConfigError, match=f"'fastest' \\(from {ENV_BACKEND}\\)"):
        open_reader()


def test_bad_sizes():
    with pytest.raises(ConfigError, match="queue depth"):
        open_reader(queue_depth=0)
    with pytest.raises(ConfigError, match="block size"):
        open_reader(block_size=1000)


def test_filesystem_refusing_o_direct(backend, monkeypatch, caplog, make_file):
    """Like tmpfs before Linux 6.6: open(O_DIRECT) fails with EINVAL -> buffered + a warning."""
    path, data = make_file(8 * PAGE + PAGE)
    real_open = os.open

    def no_direct(p, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(p, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    with caplog.at_level(logging.WARNING, logger="zeroinf"), open_reader(backend) as r:
        _read_ok(r, path, data)
        _read_ok(r, path, data)
    warnings = [rec for rec in caplog.records if "refuses O_DIRECT" in rec.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()


def test_dev_shm(backend, make_file, caplog):
    """tmpfs: O_DIRECT on Linux >= 6.6, buffered with a warning before; correct either way."""
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    import pathlib
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        path, data = make_file(16 * PAGE, pathlib.Path(d))
        with caplog.at_level(logging.WARNING, logger="zeroinf"), open_reader(backend) as r:
            _read_ok(r, path, data)
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
            refused = False
        except OSError:
            refused = True
        assert ("refuses O_DIRECT" in caplog.text) == refused
