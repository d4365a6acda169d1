"""Reader backends: each turns (fd, offset, length, address) into an asynchronous read.

A backend knows nothing about paths, tensors or alignment rules; zeroinf.io.reader checks those
and names the file in errors. The protocol, with `token` opaque to the caller:

    submit(fd, offset, length, addr, path) -> token   # starts the read, returns at once
    wait(token, timeout) -> bool                       # True: done (token consumed); False: timeout
    done(token) -> bool                                # finished? does not consume
    close()                                            # after every token was waited for

A failed read raises IOFailure from wait(), and only once no part of it is still being written:
after wait() returns or raises, the destination is the caller's again.
"""

from __future__ import annotations

import concurrent.futures as cf
import ctypes
import errno
import importlib
import os
import time
from typing import Any, Protocol


class IOFailure(Exception):
    """A read failed at file offset `at`: errno is None when the file ended (truncation)."""

    def __init__(self, err: int | None, at: int) -> None:
        super().__init__(err, at)
        self.errno, self.at = err, at


class Backend(Protocol):
    name: str

    def submit(self, fd: int, offset: int, length: int, addr: int, path: str) -> Any: ...
    def wait(self, token: Any, timeout: float | None) -> bool: ...
    def done(self, token: Any) -> bool: ...
    def close(self) -> None: ...


class NativeBackend:
    """zeroinf._native_aio: kernel AIO from C, no GIL on the I/O path. A request is split over
    `rings` C readers (each its own AIO context and I/O thread): one submitting thread keeps
    one virtio/NVMe queue busy, several keep several (seen on the device machine: a 32-thread
    preadv pool out-read a single AIO context by 8%)."""

    name = "native"

    def __init__(self, queue_depth: int, block_size: int, rings: int | None = None) -> None:
        try:
            mod = importlib.import_module("zeroinf._native_aio")
        except ImportError as e:
            raise ImportError(f"zeroinf._native_aio is not built ({e})") from None
        n = rings or int(os.environ.get("ZEROINF_IO_RINGS", "4"))
        depth = max(1, queue_depth // n)
        self.block = block_size
        # OSError if io_setup is refused
        self._rings = [mod.Reader(depth, block_size) for _ in range(max(1, n))]

    def submit(self, fd: int, offset: int, length: int, addr: int, path: str) -> list:
        # contiguous pieces of whole blocks, one per ring (fewer for short requests)
        blocks = -(-length // self.block)
        per = -(-blocks // len(self._rings)) * self.block
        token = []
        for k, start in enumerate(range(0, length, per)):
            n = min(per, length - start)
            r = self._rings[k]
            token.append((r, r.submit(fd, offset + start, n, addr + start, path)))
        return token

    def wait(self, token: list, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        for r, rid in token:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                if not r.wait(rid, left):
                    return False
            except (OSError, EOFError) as e:
                if not hasattr(e, "nread"):  # not a read failure: a bug or a closed reader
                    raise
                raise IOFailure(e.errno if isinstance(e, OSError) else None, e.offset) from None
        return True

    def done(self, token: list) -> bool:
        return all(r.done(rid) for r, rid in token)

    def close(self) -> None:
        for r in self._rings:
            r.close()


class _PoolRequest:
    def __init__(self) -> None:
        self.futures: list[cf.Future[None]] = []
        self.failed = False  # set by the first failing block: the others skip their reads


def _pread_block(req: _PoolRequest, fd: int, offset: int, length: int, addr: int) -> None:
    if req.failed:
        return
    view = memoryview((ctypes.c_char * length).from_address(addr)).cast("B")
    got = 0
    while got < length:  # os.preadv retries EINTR itself (PEP 475)
        try:
            n = os.preadv(fd, [view[got:]], offset + got)
        except BlockingIOError:
            continue
        except OSError as e:
            req.failed = True
            raise IOFailure(e.errno, offset + got) from None
        # 0 bytes is end of file; so is a read cut off the 4096 grid that every request is on
        # (with O_DIRECT the next read would start unaligned and fail with EINVAL instead).
        if n == 0 or n % 4096:
            req.failed = True
            raise IOFailure(None, offset + got + n)
        got += n


class ThreadPoolBackend:
    """os.preadv in `queue_depth` threads, one block per task. Needs nothing but Python."""

    name = "threadpool"

    def __init__(self, queue_depth: int, block_size: int) -> None:
        self._pool = cf.ThreadPoolExecutor(queue_depth, thread_name_prefix="zeroinf-io")
        self._bs = block_size

    def submit(self, fd: int, offset: int, length: int, addr: int, path: str) -> _PoolRequest:
        req = _PoolRequest()
        for pos in range(0, length, self._bs):
            n = min(self._bs, length - pos)
            req.futures.append(
                self._pool.submit(_pread_block, req, fd, offset + pos, n, addr + pos)
            )
        return req

    def wait(self, token: _PoolRequest, timeout: float | None) -> bool:
        _, pending = cf.wait(token.futures, timeout)
        if pending:
            return False
        failures = [f.exception() for f in token.futures if f.exception() is not None]
        if failures:
            first = min(failures, key=lambda e: getattr(e, "at", 0))
            if isinstance(first, IOFailure):
                raise first
            raise IOFailure(errno.EIO, 0) from first
        return True

    def done(self, token: _PoolRequest) -> bool:
        return all(f.done() for f in token.futures)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def make_backend(name: str, queue_depth: int, block_size: int) -> Backend:
    """Raises ImportError or OSError when the backend cannot run here."""
    if name == "native":
        return NativeBackend(queue_depth, block_size)
    if name == "libaio":
        from zeroinf.io.libaio_backend import LibaioBackend

        return LibaioBackend(queue_depth, block_size)
    if name == "threadpool":
        return ThreadPoolBackend(queue_depth, block_size)
    raise ValueError(f"unknown io backend {name!r}")
