"""The reader the executor uses: one interface over the backends, files opened once per path.

    with open_reader() as r:                       # backend from the argument, the environment
        h = r.submit(path, 0, dest)                # variable ZEROINF_IO_BACKEND, or the best here
        ...                                        # (native -> libaio -> threadpool)
        h.wait()                                   # ReadError naming file and offsets

Reads use O_DIRECT (no page cache: the weights pass through RAM once, and reads run at the
drive's speed), so offset, length and destination must be 4096-aligned; aligned_empty and
PinnedArena give such buffers. A filesystem that refuses O_DIRECT (tmpfs) is read buffered,
with a warning.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any

import torch

from zeroinf.errors import ConfigError, ReadError
from zeroinf.io.backends import Backend, IOFailure, make_backend
from zeroinf.sizes import ALIGN, fmt_bytes

logger = logging.getLogger("zeroinf")

BACKENDS = ("native", "libaio", "threadpool")  # the automatic choice tries them in this order
ENV_BACKEND = "ZEROINF_IO_BACKEND"
ENV_FAULTS = "ZEROINF_IO_FAULTS"  # see zeroinf/io/faults.py
_announced: set[tuple[Any, ...]] = set()  # the backend choice is logged once per process


class RequestError(ReadError, ValueError):
    """A read request breaks the rules (alignment, dtype, device): a caller's bug, not I/O."""


def read_error(path: str, offset: int, nbytes: int, failure: IOFailure) -> ReadError:
    """The one message format for failed reads: file, request, and where it failed."""
    if failure.errno is None:
        why = "unexpected end of file (truncated?)"
    else:
        why = f"{os.strerror(failure.errno)} (errno {failure.errno})"
    err = ReadError(
        f"{path}: read of {nbytes} bytes at offset {offset} failed at offset {failure.at}: {why}"
    )
    err.path, err.offset, err.errno = path, failure.at, failure.errno
    return err


def check_request(path: str, offset: int, dest: torch.Tensor) -> int:
    """Validate a request; returns its length in bytes."""
    where = f"{path}: read at offset {offset}"
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or offset % ALIGN:
        raise RequestError(f"{where}: offset must be a non-negative multiple of {ALIGN}")
    if not isinstance(dest, torch.Tensor):
        raise RequestError(f"{where}: dest must be a torch.Tensor, not {type(dest).__name__}")
    if dest.dtype != torch.uint8 or dest.device.type != "cpu" or not dest.is_contiguous():
        raise RequestError(
            f"{where}: dest must be a contiguous uint8 CPU tensor "
            f"(got {dest.dtype} on {dest.device}, contiguous={dest.is_contiguous()})"
        )
    if dest.data_ptr() % ALIGN:
        raise RequestError(
            f"{where}: dest address {dest.data_ptr():#x} is not {ALIGN}-aligned "
            "(allocate with zeroinf.io.aligned_empty or PinnedArena)"
        )
    if dest.numel() % ALIGN:
        raise RequestError(f"{where}: length {dest.numel()} is not a multiple of {ALIGN}")
    return dest.numel()


class ReadHandle:
    """One submitted read. wait() returns once every byte is in dest, or raises ReadError;
    either way nothing writes into dest afterwards."""

    def __init__(
        self, reader: Reader, token: Any, path: str, offset: int, dest: torch.Tensor
    ) -> None:
        self.path, self.offset, self.nbytes = path, offset, dest.numel()
        self.dest = dest  # kept alive until the read is over
        self._reader, self._token = reader, token
        self._lock = threading.Lock()
        self._over = token is None  # the backend has reported (token consumed)
        self._error: ReadError | None = None

    def _settle(self, timeout: float | None) -> bool:
        """Ask the backend once; the lock is held."""
        if self._over:
            return True
        try:
            if not self._reader._backend.wait(self._token, timeout):
                return False
        except IOFailure as f:
            self._error = read_error(self.path, self.offset, self.nbytes, f)
        self._over = True
        self._reader._forget(self)
        return True

    def done(self) -> bool:
        """True once the read is over (successful or not). Never blocks."""
        if not self._lock.acquire(blocking=False):
            return False  # another thread is waiting on it: not known to be over
        try:
            return self._settle(0)
        finally:
            self._lock.release()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the read is over; raises ReadError if it failed, TimeoutError if
        `timeout` seconds pass first (the read goes on; wait again)."""
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"{self.path}: read at offset {self.offset} still running")
        try:
            if not self._settle(timeout):
                raise TimeoutError(
                    f"{self.path}: read of {self.nbytes} bytes at offset {self.offset} "
                    f"not done after {timeout} s"
                )
        finally:
            self._lock.release()
        if self._error is not None:
            raise self._error


class Reader:
    """Asynchronous reads of aligned byte ranges of files into aligned CPU tensors."""

    def __init__(self, backend: Backend, queue_depth: int, block_size: int) -> None:
        self.name = backend.name
        self.queue_depth, self.block_size = queue_depth, block_size
        self._backend = backend
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._buffered_devs: set[int] = set()  # filesystems already warned about
        self._live: set[ReadHandle] = set()  # submitted, not yet reported over
        self._closed = False

    def submit(self, path: str | os.PathLike[str], offset: int, dest: torch.Tensor) -> ReadHandle:
        """Start reading dest.numel() bytes of `path` at `offset` into dest."""
        p = os.fspath(path)
        nbytes = check_request(p, offset, dest)
        with self._lock:  # so that close() sees every read submitted before it
            if self._closed:
                raise ValueError("I/O operation on a closed Reader")
            fd = self._fds.get(p)
            if fd is None:
                fd = self._fds[p] = self._open(p)
            if not nbytes:
                return ReadHandle(self, None, p, offset, dest)
            token = self._backend.submit(fd, offset, nbytes, dest.data_ptr(), p)
            handle = ReadHandle(self, token, p, offset, dest)
            self._live.add(handle)
        return handle

    def submit_padded(
        self, path: str | os.PathLike[str], offset: int, dest: torch.Tensor, file_nbytes: int
    ) -> ReadHandle:
        """Like submit, for a byte range that may run past the end of a file of `file_nbytes`
        (a multiple of 4096): rank r's range of a unit padded for N ranks. The part past the
        end is zero-filled now; only the part inside the file is read."""
        check_request(os.fspath(path), offset, dest)
        inside = max(0, min(dest.numel(), file_nbytes - offset))
        dest[inside:].zero_()
        return self.submit(path, offset, dest[:inside])

    def _forget(self, handle: ReadHandle) -> None:
        with self._lock:
            self._live.discard(handle)

    def _open(self, path: str) -> int:
        flags = os.O_RDONLY | os.O_CLOEXEC
        try:
            return os.open(path, flags | os.O_DIRECT)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise ReadError(f"{path}: cannot open ({e.strerror})") from None
        # The filesystem refuses O_DIRECT (tmpfs, some FUSE): correct but through the page
        # cache, which costs RAM and copies. Say so once per filesystem.
        try:
            fd = os.open(path, flags)
        except OSError as e:
            raise ReadError(f"{path}: cannot open ({e.strerror})") from None
        dev = os.fstat(fd).st_dev
        if dev not in self._buffered_devs:
            self._buffered_devs.add(dev)
            logger.warning(
                "%s: the filesystem refuses O_DIRECT; reading it buffered (through the page "
                "cache: slower, and it uses RAM)",
                path,
            )
        return fd

    def close(self) -> None:
        """Wait for reads still running (their errors are dropped), then free everything."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            live = list(self._live)
        for h in live:
            try:
                h.wait()
            except ReadError:
                pass
        self._backend.close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Reader({self.name!r}, queue_depth={self.queue_depth}, "
            f"block_size={fmt_bytes(self.block_size)})"
        )


def open_reader(
    backend: str | None = None, queue_depth: int = 32, block_size: int = 1 << 20
) -> Reader:
    """A Reader on `backend` (native | libaio | threadpool | auto); None means the environment
    variable ZEROINF_IO_BACKEND, else auto: the first that works here, in that order. A named
    backend that cannot run raises ConfigError; auto says which one it fell back to."""
    if queue_depth < 1:
        raise ConfigError(f"io queue depth {queue_depth} must be >= 1")
    if block_size <= 0 or block_size % ALIGN:
        raise ConfigError(f"io block size {block_size} must be a positive multiple of {ALIGN}")
    source = "argument" if backend else ENV_BACKEND if os.environ.get(ENV_BACKEND) else "default"
    wanted = (backend or os.environ.get(ENV_BACKEND) or "auto").strip().lower()
    if wanted not in (*BACKENDS, "auto"):
        raise ConfigError(
            f"io backend {wanted!r} (from {source}) is not one of auto, {', '.join(BACKENDS)}"
        )
    faults = None
    if os.environ.get(ENV_FAULTS):  # fault injection for soak tests (zeroinf/io/faults.py)
        from zeroinf.io.faults import RandomFaults

        faults = RandomFaults.parse(os.environ[ENV_FAULTS])
    skipped: list[str] = []
    for name in BACKENDS if wanted == "auto" else (wanted,):
        try:
            impl = make_backend(name, queue_depth, block_size)
        except (ImportError, OSError) as e:
            if wanted != "auto":
                raise ConfigError(f"io backend {name!r} (from {source}) cannot run: {e}") from None
            skipped.append(f"{name}: {e}")
            continue
        _announce(name, source, skipped, queue_depth, block_size)
        reader = Reader(impl, queue_depth, block_size)
        if faults is not None:
            from zeroinf.io.faults import FaultyReader

            logger.warning("%s=%s: injecting read faults (testing only)", ENV_FAULTS, faults)
            return FaultyReader(reader, random_faults=faults)  # type: ignore[return-value]
        return reader
    raise AssertionError("the threadpool backend always works")


def _announce(name: str, source: str, skipped: list[str], qd: int, bs: int) -> None:
    key = (name, source, tuple(skipped))
    if key in _announced:
        return
    _announced.add(key)
    what = f"io backend {name!r} ({source}; queue depth {qd}, block {fmt_bytes(bs)})"
    if skipped:  # a fallback changes speed: say so where people look
        logger.warning("%s; unavailable: %s", what, "; ".join(skipped))
    else:
        logger.info(what)
