"""Fault injection for tests: a Reader look-alike that fails, truncates or slows chosen reads.

    r = FaultyReader(open_reader(), fail_at={4096: errno.EIO}, short_at=[(path, 8192)], delay=0.1)

A fault key chooses which reads it hits:
    int offset          -> any file's read whose byte range holds that offset (fails there)
    path                -> every read of that file (fails at the read's offset)
    (path, int offset)  -> that file's read holding that offset

fail_at={key: errno} fails the read with that errno; short_at=[key, ...] behaves like a file
truncated at that offset (bytes before it are read, then "unexpected end of file"); delay (a
float, or {key: seconds}) holds the read back that long. The real backend still runs every
read, so in-flight behaviour is real; errors use the same message format as real failures.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Mapping

import torch

from zeroinf.io.backends import IOFailure
from zeroinf.io.reader import Reader, ReadHandle, check_request, open_reader, read_error
from zeroinf.sizes import ALIGN

FaultKey = int | str | os.PathLike | tuple[str | os.PathLike, int]


def _same_file(a: str | os.PathLike[str], b: str) -> bool:
    return os.path.abspath(os.fspath(a)) == os.path.abspath(b)


def _hit(key: FaultKey, path: str, offset: int, nbytes: int) -> int | None:
    """The file offset where `key` strikes the read (path, offset, nbytes), or None."""
    if isinstance(key, tuple):
        p, at = key
        return at if _same_file(p, path) and offset <= at < offset + nbytes else None
    if isinstance(key, int):
        return key if offset <= key < offset + nbytes else None
    return offset if _same_file(key, path) else None


class FaultyHandle:
    def __init__(
        self, inner: ReadHandle, nbytes: int, delay: float, failure: IOFailure | None
    ) -> None:
        self.path, self.offset, self.nbytes = inner.path, inner.offset, nbytes
        self._inner, self._failure = inner, failure
        self._ready_at = time.monotonic() + delay

    def done(self) -> bool:
        return self._inner.done() and time.monotonic() >= self._ready_at

    def wait(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._inner.wait(timeout)
        except Exception:
            if self._failure is None:
                raise
        rest = self._ready_at - time.monotonic()
        if deadline is not None and self._ready_at > deadline:
            time.sleep(max(0.0, deadline - time.monotonic()))
            raise TimeoutError(f"{self.path}: read at offset {self.offset} (delayed) not done")
        if rest > 0:
            time.sleep(rest)
        if self._failure is not None:
            raise read_error(self.path, self.offset, self.nbytes, self._failure)


class FaultyReader:
    def __init__(
        self,
        inner: Reader | None = None,
        fail_at: Mapping[FaultKey, int] | None = None,
        short_at: Iterable[FaultKey] = (),
        delay: float | Mapping[FaultKey, float] = 0.0,
    ) -> None:
        self.inner = inner if inner is not None else open_reader()
        self.name = self.inner.name
        self.fail_at = dict(fail_at or {})
        self.short_at = list(short_at)
        self.delay = delay
        self.submitted: list[tuple[str, int, int]] = []  # (path, offset, nbytes), in order
        self._lock = threading.Lock()

    def submit(self, path: str | os.PathLike[str], offset: int, dest: torch.Tensor) -> FaultyHandle:
        p = os.fspath(path)
        nbytes = check_request(p, offset, dest)
        with self._lock:
            self.submitted.append((p, offset, nbytes))
        failure = None
        for key, err in self.fail_at.items():
            if (at := _hit(key, p, offset, nbytes)) is not None:
                failure = IOFailure(err, at)
                break
        for key in self.short_at:
            at = _hit(key, p, offset, nbytes)
            if at is not None and (failure is None or at < failure.at):
                failure = IOFailure(None, at)
                dest = dest[: (at - offset) // ALIGN * ALIGN]  # the bytes before the cut
        if isinstance(self.delay, Mapping):
            hits = (s for k, s in self.delay.items() if _hit(k, p, offset, nbytes) is not None)
            delay = max(hits, default=0.0)
        else:
            delay = float(self.delay)
        return FaultyHandle(self.inner.submit(p, offset, dest), nbytes, delay, failure)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> FaultyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
