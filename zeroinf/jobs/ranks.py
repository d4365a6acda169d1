"""Sharing a job among ranks (torchrun): who runs which record, where each rank writes, and how
rank 0 folds the part files into the output. Pure functions of (rank, world, paths)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from zeroinf.jobs.output import read_keys
from zeroinf.jobs.records import JobError, Key

log = logging.getLogger("zeroinf")

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"RANK={self.rank} is not in [0, WORLD_SIZE={self.world})")

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Ranks:
        """torchrun's RANK / WORLD_SIZE; a single process without them."""
        try:
            return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")))
        except ValueError as e:
            raise JobError(f"RANK/WORLD_SIZE: {e}") from None


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Items whose position in the whole input (their `index`) is rank modulo world."""
    return [it for it in items if it.index % world == rank]  # type: ignore[attr-defined]


def part_path(output: Path, rank: int, world: int) -> Path:
    """Where a rank appends: OUTPUT itself for one process, OUTPUT.rank<r> with several."""
    return output if world == 1 else output.with_name(f"{output.name}.rank{rank}")


def existing_parts(output: Path) -> list[Path]:
    """Part files beside OUTPUT from this or an earlier run (of any world size)."""
    parts = output.parent.glob(f"{output.name}.rank*")
    return sorted(
        (p for p in parts if p.name.removeprefix(f"{output.name}.rank").isdigit()),
        key=lambda p: int(p.name.removeprefix(f"{output.name}.rank")),
    )


def done_keys(output: Path) -> set[Key]:
    """Every key already written, in OUTPUT or any part file: a resume with another world size
    neither repeats nor loses a record."""
    return read_keys([output, *existing_parts(output)])


def wait_for(
    output: Path, expected: set[Key], poll_s: float = 0.5, timeout_s: float | None = None
) -> None:
    """Rank 0: wait until every expected key is in OUTPUT or a part file. With torch.distributed
    a barrier comes first and this returns at once; without it, this is the barrier."""
    t0 = last = time.monotonic()
    while missing := expected - done_keys(output):
        now = time.monotonic()
        if timeout_s is not None and now - t0 > timeout_s:
            raise JobError(f"{len(missing)} record(s) of other ranks never reached {output}.rank*")
        if now - last > 30:
            log.info("waiting for other ranks: %d record(s) to go", len(missing))
            last = now
        time.sleep(poll_s)
