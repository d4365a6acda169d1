"""The results file: append-only JSONL, one line per finished record, durable per batch.

A batch of lines goes down in one write, then flush and fsync, so a crash loses at most the batch
being written. On open, a torn tail (the part of a line that a crash cut short, or garbage that
a power loss left after the last complete line) is cut off; the records it held are generated
again, identically. A restart skips every record whose key is already in the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from zeroinf.jobs.records import JobError, Key, id_key, line_key


def output_key(obj: dict[str, Any]) -> Key:
    """The key of a results line: its line number for line-level errors, else its id."""
    if "line" in obj and "error" in obj:
        return line_key(int(obj["line"]))
    return id_key(obj["id"])


def _valid(line: bytes) -> dict[str, Any] | None:
    """A results line, or None for anything else (garbage, a torn write, a foreign line)."""
    try:
        obj = json.loads(line)
        if not isinstance(obj, dict) or "id" not in obj:
            return None
        if "text" not in obj and "error" not in obj:
            return None
        output_key(obj)  # a line whose key cannot be formed is not one of ours
    except (ValueError, TypeError, RecursionError):  # JSON/UTF-8 errors, numbers, deep nesting
        return None
    return obj


def scan(path: Path, strict: bool = True) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of a results file and the byte length they span.

    Lines after the last newline, and a trailing run of invalid lines, are a torn tail and are
    not counted. An invalid line FOLLOWED by valid ones is not a crash artefact: with strict it
    raises JobError (the file is not ours to rewrite), otherwise it is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], 0
    except OSError as e:
        raise JobError(f"--output {path}: {e.strerror or e}") from None
    records: list[dict[str, Any]] = []
    good = pos = 0
    first_bad: int | None = None
    for n, line in enumerate(data.split(b"\n")[:-1], start=1):  # the last piece has no newline
        pos += len(line) + 1
        obj = _valid(line)
        if obj is None:
            if first_bad is None:
                first_bad = n
            continue
        if first_bad is not None and strict:
            raise JobError(
                f"--output {path}: line {first_bad} is not a results line but later lines are; "
                "this is not a torn write from a crash (fix or move the file)"
            )
        records.append(obj)
        good = pos
    return records, good


def read_keys(paths: Iterable[Path]) -> set[Key]:
    """Keys of every complete line in these files (torn tails ignored, files may be missing)."""
    keys: set[Key] = set()
    for p in paths:
        keys.update(output_key(o) for o in scan(p, strict=False)[0])
    return keys


def _fsync_dir(path: Path) -> None:
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultWriter:
    """Appends batches of results lines to PATH after cutting off a torn tail. Use as a context
    manager; close() also cuts off a batch that an interrupt left half-written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        records, self.size = scan(path)
        self.keys: set[Key] = {output_key(o) for o in records}
        self.repaired = 0  # bytes of torn tail cut off on open
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        end = os.fstat(self.fd).st_size
        if end != self.size:
            self.repaired = end - self.size
            os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
        _fsync_dir(path)

    def write(self, lines: list[dict[str, Any]]) -> None:
        """One batch: one write of all its lines, then fsync. Keys already present are dropped
        (nothing is ever duplicated). A failed write or fsync (a full disk) cuts the batch off
        again and raises JobError: the file ends with the last batch that went down whole."""
        new = [o for o in lines if output_key(o) not in self.keys]
        if not new:
            return
        data = b"".join(json.dumps(o, ensure_ascii=False).encode() + b"\n" for o in new)
        view = memoryview(data)
        try:
            os.lseek(self.fd, self.size, os.SEEK_SET)
            while view:
                view = view[os.write(self.fd, view) :]
            os.fsync(self.fd)
        except OSError as e:
            try:
                os.ftruncate(self.fd, self.size)  # shrinking needs no space
            except OSError:
                pass  # the next open cuts the torn tail off instead
            raise JobError(
                f"--output {self.path}: {e.strerror or e} while writing {len(new)} record(s); "
                "every record before them is kept: free space and rerun to resume"
            ) from None
        self.size += len(data)
        self.keys.update(output_key(o) for o in new)

    def close(self) -> None:
        if self.fd < 0:
            return
        if os.fstat(self.fd).st_size != self.size:  # a write cut short by an interrupt
            os.ftruncate(self.fd, self.size)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge(output: Path, parts: list[Path]) -> int:
    """Fold part files into OUTPUT atomically (temp file, fsync, rename), keeping the first line
    of each key, then delete the parts. Returns the number of lines in OUTPUT. Safe to repeat
    after a crash at any point: the parts are deleted only once OUTPUT holds their lines."""
    seen: set[Key] = set()
    lines: list[dict[str, Any]] = []
    for p in [output, *parts]:
        for o in scan(p, strict=False)[0]:
            k = output_key(o)
            if k not in seen:
                seen.add(k)
                lines.append(o)
    tmp = output.with_name(output.name + ".merging")
    with open(tmp, "wb") as f:
        f.write(b"".join(json.dumps(o, ensure_ascii=False).encode() + b"\n" for o in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    _fsync_dir(output)
    for p in parts:
        p.unlink(missing_ok=True)
    return len(lines)
