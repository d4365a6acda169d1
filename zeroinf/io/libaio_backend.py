"""The py-libaio backend (`libaio` on PyPI; needs the libaio.so.1 system library).

The same scheme as native/aio.c, in Python: one I/O thread keeps up to `queue_depth` blocks in
the kernel, oldest request first; completions and new submissions both bump one eventfd, so
the thread sleeps in a single read() and wakes for either. ctypes releases the GIL inside the
libaio calls, and os.read releases it while sleeping.
"""

from __future__ import annotations

import ctypes
import errno
import threading
import time
from collections import deque
from typing import Any

from zeroinf.io.backends import IOFailure

_MAX_RETRIES = 64  # per block, for EINTR/EAGAIN completions


class _Request:
    def __init__(self, fd: int, offset: int, length: int, addr: int) -> None:
        self.fd, self.offset, self.length, self.addr = fd, offset, length, addr
        self.assigned = 0  # bytes handed to blocks so far
        self.blocks = 0  # blocks in the kernel or waiting for resubmission
        self.failure: IOFailure | None = None
        self.finished = threading.Event()

    def fail(self, err: int | None, at: int) -> None:
        if self.failure is None or at < self.failure.at:
            self.failure = IOFailure(err, at)


class LibaioBackend:
    name = "libaio"

    def __init__(self, queue_depth: int, block_size: int) -> None:
        import libaio  # OSError when libaio.so.1 is missing, ImportError when not installed

        self._aio = libaio
        self._qd, self._bs = queue_depth, block_size
        self._ctx = libaio.AIOContext(queue_depth)
        self._efd = libaio.EventFD()
        self._lock = threading.Lock()
        self._pending: deque[_Request] = deque()  # requests with unassigned bytes
        self._retry: list[Any] = []  # blocks to resubmit
        self._free = [libaio.AIOBlock(libaio.AIOBLOCK_MODE_READ) for _ in range(queue_depth)]
        self._owner: dict[Any, tuple[_Request, list[int]]] = {}  # block -> (request, [retries])
        self._in_kernel = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="zeroinf-libaio", daemon=True)
        self._thread.start()

    # ---- called from Python threads ----

    def submit(self, fd: int, offset: int, length: int, addr: int, path: str) -> _Request:
        req = _Request(fd, offset, length, addr)
        with self._lock:
            if self._stop:
                raise ValueError("I/O operation on a closed reader")
            if length == 0:
                req.finished.set()
            else:
                self._pending.append(req)
        self._efd.write(1)
        return req

    def wait(self, token: _Request, timeout: float | None) -> bool:
        if not token.finished.wait(timeout):
            return False
        if token.failure is not None:
            raise token.failure
        return True

    def done(self, token: _Request) -> bool:
        return token.finished.is_set()

    def close(self) -> None:
        with self._lock:
            self._stop = True
        self._efd.write(1)
        self._thread.join()
        self._ctx.close()
        self._efd.close()

    # ---- the I/O thread; everything below holds self._lock unless it says otherwise ----

    def _finish_if_done(self, req: _Request) -> None:
        if req.blocks == 0 and (req.failure is not None or req.assigned == req.length):
            req.finished.set()

    def _fail(self, req: _Request, err: int | None, at: int) -> None:
        req.fail(err, at)
        if self._pending and self._pending[0] is req:  # only the head has unassigned bytes
            self._pending.popleft()

    def _release(self, block: Any) -> None:
        req, _ = self._owner.pop(block)
        self._free.append(block)
        req.blocks -= 1
        self._finish_if_done(req)

    def _fill(self) -> list[Any]:
        if self._stop:  # closing: cancel what the kernel has not seen yet
            for block in self._retry:
                self._fail(self._owner[block][0], errno.ECANCELED, block.offset)
                self._release(block)
            self._retry.clear()
            while self._pending:
                req = self._pending[0]
                self._fail(req, errno.ECANCELED, req.offset + req.assigned)
                self._finish_if_done(req)
            return []
        batch, self._retry = self._retry, []
        while self._free and self._pending:
            req = self._pending[0]
            n = min(self._bs, req.length - req.assigned)
            block = self._free.pop()
            buf = (ctypes.c_char * n).from_address(req.addr + req.assigned)
            block.target_file = req.fd
            block.buffer_list = [buf]
            block.offset = req.offset + req.assigned
            block.eventfd = self._efd
            self._owner[block] = (req, [0])
            req.assigned += n
            req.blocks += 1
            if req.assigned == req.length:
                self._pending.popleft()
            batch.append(block)
        return batch

    def _complete(self, block: Any, res: int) -> None:
        req, retries = self._owner[block]
        self._in_kernel -= 1
        want = len(memoryview(block.buffer_list[0]))
        if res < 0:
            if (
                -res in (errno.EINTR, errno.EAGAIN)
                and retries[0] < _MAX_RETRIES
                and not (req.failure or self._stop)
            ):
                retries[0] += 1
                self._retry.append(block)
                return
            self._fail(req, -res, block.offset)
        elif res < want:
            # 0 bytes, or a read cut off the 4096 grid that every request is on: the file ended.
            if res == 0 or res % 4096:
                self._fail(req, None, block.offset + res)
            elif req.failure is None and not self._stop:
                rest = block.buffer_list[0]
                addr = ctypes.addressof(rest) + res
                block.buffer_list = [(ctypes.c_char * (want - res)).from_address(addr)]
                block.offset += res
                self._retry.append(block)
                return
        self._release(block)

    def _submit(self, batch: list[Any]) -> bool:
        """Hand `batch` to the kernel (lock NOT held). True if some must wait for resources."""
        sent = 0
        while sent < len(batch):
            try:
                n = self._ctx.submit(batch[sent:])
            except OSError as e:
                with self._lock:
                    if e.errno in (errno.EAGAIN, errno.EINTR):
                        self._retry.extend(batch[sent:])
                        return True
                    block = batch[sent]  # refused (EINVAL: misaligned, EBADF, ...)
                    self._fail(self._owner[block][0], e.errno, block.offset)
                    self._release(block)
                sent += 1
                continue
            with self._lock:
                self._in_kernel += n
            sent += n
            if n == 0:
                with self._lock:
                    self._retry.extend(batch[sent:])
                return True
        return False

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug here must not leave waiters hanging
            self._ctx.close()  # io_destroy: waits until the kernel is done with the buffers
            with self._lock:
                self._stop = True
                reqs = list(self._pending) + [req for req, _ in self._owner.values()]
                for req in reqs:
                    req.fail(errno.EIO, req.offset)
                    req.finished.set()
            raise RuntimeError("zeroinf libaio I/O thread failed") from e

    def _loop(self) -> None:
        while True:
            with self._lock:
                batch = self._fill()
                if self._stop and not batch and self._in_kernel == 0 and not self._retry:
                    return
            again = self._submit(batch)
            with self._lock:
                in_kernel = self._in_kernel
            if again and in_kernel == 0:
                time.sleep(0.001)
                continue
            self._efd.read()  # a completion, a submit() or close(); the counter loses none
            if in_kernel == 0:
                continue
            events = self._ctx.getEvents(min_nr=0, nr=self._qd, timeout=0)
            with self._lock:
                for block, res, _ in events:
                    self._complete(block, res)
