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

Random faults, for soak tests of whole jobs: set ZEROINF_IO_FAULTS and every reader that
open_reader makes is wrapped (with a warning), e.g.

    ZEROINF_IO_FAULTS="eio=0.001,short=0.0005,delay=0.01,delay_s=0.2,seed=7"

fails each read with EIO with probability 0.001 (at a random page of it), cuts it short with
probability 0.0005, and holds it back 0.2 s with probability 0.01; each injection is logged.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from zeroinf.errors import ConfigError
from zeroinf.io.backends import IOFailure
from zeroinf.io.reader import (
    ENV_FAULTS,
    Reader,
    ReadHandle,
    check_request,
    open_reader,
    read_error,
)
from zeroinf.sizes import ALIGN

FaultKey = int | str | os.PathLike | tuple[str | os.PathLike, int]
logger = logging.getLogger("zeroinf")


@dataclass(frozen=True)
class RandomFaults:
    """Per-read probabilities of an EIO, a short read and a delay of delay_s seconds."""

    eio: float = 0.0
    short: float = 0.0
    delay: float = 0.0
    delay_s: float = 0.1
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("eio", "short", "delay"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{ENV_FAULTS}: {name}={getattr(self, name)} not in [0, 1]")
        if not self.delay_s >= 0:
            raise ConfigError(f"{ENV_FAULTS}: delay_s={self.delay_s} must be >= 0")

    @classmethod
    def parse(cls, spec: str) -> RandomFaults:
        """From "eio=P,short=P,delay=P,delay_s=S,seed=N" (any subset)."""
        kw: dict[str, float | int] = {}
        for item in filter(None, (x.strip() for x in spec.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or key not in ("eio", "short", "delay", "delay_s", "seed"):
                raise ConfigError(
                    f"{ENV_FAULTS}: {item!r} is not one of eio=P, short=P, delay=P, delay_s=S, "
                    "seed=N"
                )
            try:
                kw[key] = int(value) if key == "seed" else float(value)
            except ValueError:
                raise ConfigError(f"{ENV_FAULTS}: {item!r}: {value!r} is not a number") from None
        return cls(**kw)  # type: ignore[arg-type]


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
        random_faults: RandomFaults | None = None,
    ) -> None:
        self.inner = inner if inner is not None else open_reader()
        self.name = self.inner.name
        self.fail_at = dict(fail_at or {})
        self.short_at = list(short_at)
        self.delay = delay
        self.random_faults = random_faults
        self._rng = random.Random(random_faults.seed if random_faults else None)
        self.submitted: list[tuple[str, int, int]] = []  # (path, offset, nbytes), in order
        self.injected: dict[str, int] = {"eio": 0, "short": 0, "delay": 0}  # random faults
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
        if self.random_faults is not None and failure is None and nbytes:
            failure, dest, delay = self._random(p, offset, nbytes, dest, delay)
        return FaultyHandle(self.inner.submit(p, offset, dest), nbytes, delay, failure)

    def _random(
        self, path: str, offset: int, nbytes: int, dest: torch.Tensor, delay: float
    ) -> tuple[IOFailure | None, torch.Tensor, float]:
        f = self.random_faults
        assert f is not None
        with self._lock:
            roll, at, late = (
                self._rng.random(),
                self._rng.randrange(0, nbytes, ALIGN),
                self._rng.random(),
            )
        failure = None
        if roll < f.eio + f.short:
            kind = "eio" if roll < f.eio else "short"
            failure = IOFailure(errno.EIO if kind == "eio" else None, offset + at)
            if kind == "short":
                dest = dest[:at]
            self._count(kind, f"{path}: injected {kind} at offset {offset + at}")
        if late < f.delay:
            delay = max(delay, f.delay_s)
            self._count("delay", f"{path}: injected a {f.delay_s} s delay at offset {offset}")
        return failure, dest, delay

    def _count(self, kind: str, what: str) -> None:
        with self._lock:
            self.injected[kind] += 1
        logger.warning("%s (%s)", what, ENV_FAULTS)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> FaultyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
