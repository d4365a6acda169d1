"""Storage I/O: asynchronous aligned reads (native kernel AIO, py-libaio or a thread pool) and
the host buffers they land in. See zeroinf/io/reader.py for the interface."""

from __future__ import annotations

from zeroinf.io.faults import FaultyReader
from zeroinf.io.memory import PinnedArena, aligned_empty
from zeroinf.io.reader import (
    BACKENDS,
    ENV_BACKEND,
    Reader,
    ReadHandle,
    RequestError,
    open_reader,
)

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "FaultyReader",
    "PinnedArena",
    "ReadHandle",
    "Reader",
    "RequestError",
    "aligned_empty",
    "open_reader",
]
