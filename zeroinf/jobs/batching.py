"""Turning requests into forward passes. The job loop only consumes a Scheduler's finished rows;
the static batcher here is one Scheduler, a continuous-refill scheduler (new prompts taking the
places of finished rows inside the executor) is meant to be another."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from zeroinf.jobs.records import JobError, Key, Request, Sampling

log = logging.getLogger("zeroinf")

# One finished row: the request and its raw new tokens (at least its max_new_tokens unless it
# stopped at an end-of-sequence token; anything after that is padding).
Row = tuple[Request, list[int]]
# Generates one batch: requests of equal Sampling -> new tokens per row, in order.
GenerateFn = Callable[[Sequence[Request]], list[list[int]]]


class Scheduler(Protocol):
    def run(self, requests: Sequence[Request], done: Container[Key]) -> Iterator[list[Row]]:
        """Generate every request whose key is not in `done`; yield finished rows in groups, each
        group written (and fsynced) by the caller before the next is asked for."""
        ...

    def total_batches(self, requests: Sequence[Request], done: Container[Key]) -> int:
        """How many groups run() will yield (for progress logs)."""
        ...


def sampling_groups(requests: Sequence[Request]) -> dict[Sampling, list[Request]]:
    groups: dict[Sampling, list[Request]] = {}
    for r in requests:
        groups.setdefault(r.sampling, []).append(r)
    return groups


def plan_batches(
    requests: Sequence[Request], batch_size: int, max_positions: int
) -> list[list[Request]]:
    """Batches of at most batch_size requests with equal Sampling, of similar prompt length (sorted
    by it, so left padding stays short), each fitting the model: longest prompt + largest
    max_new_tokens <= max_positions. A pure function of the requests: a resumed job forms the same
    batches, so even batch-dependent rounding cannot make its outputs differ."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    batches: list[list[Request]] = []
    for group in sampling_groups(requests).values():
        group = sorted(group, key=lambda r: (len(r.prompt_ids), r.max_new_tokens, r.index))
        cur: list[Request] = []
        for r in group:
            fits = (
                len(cur) < batch_size
                and len(r.prompt_ids) + max([r.max_new_tokens, *(c.max_new_tokens for c in cur)])
                <= max_positions
            )
            if cur and not fits:
                batches.append(cur)
                cur = []
            cur.append(r)
        if cur:
            batches.append(cur)
    return batches


def out_of_memory(e: BaseException) -> bool:
    """A device allocation failed (torch.OutOfMemoryError); torch is imported by the caller."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.cuda.OutOfMemoryError)


@dataclass
class StaticBatcher:
    """Fixed batches: a batch runs until its last row is done, then the next one starts.

    A batch that runs out of device memory runs again in halves (and halves again while they
    do); the smaller size then holds for the rest of the job. The batches themselves stay those
    of plan_batches, so which rows share a batch, and so every output, is unchanged."""

    generate: GenerateFn
    batch_size: int
    max_positions: int
    max_rows: int | None = None  # rows per generate call, once a batch ran out of memory

    def _todo(self, requests: Sequence[Request], done: Container[Key]) -> list[list[Request]]:
        batches = plan_batches(requests, self.batch_size, self.max_positions)
        return [b for b in batches if any(r.key not in done for r in b)]

    def total_batches(self, requests: Sequence[Request], done: Container[Key]) -> int:
        return len(self._todo(requests, done))

    def run(self, requests: Sequence[Request], done: Container[Key]) -> Iterator[list[Row]]:
        for batch in self._todo(requests, done):
            # A batch that a crash left half-written runs whole again, so that its rows see the
            # same batch-mates as in an uninterrupted run; only its missing rows are yielded.
            new = self._generate(batch)
            yield [(r, t) for r, t in zip(batch, new, strict=True) if r.key not in done]

    def _generate(self, batch: list[Request]) -> list[list[int]]:
        """New tokens for `batch`, in pieces of at most max_rows rows."""
        out: list[list[int]] = []
        while len(out) < len(batch):
            piece = batch[len(out) : len(out) + (self.max_rows or len(batch))]
            try:
                out.extend(self.generate(piece))
            except Exception as e:
                if not out_of_memory(e):
                    raise
                if len(piece) == 1:
                    raise JobError(
                        f"record {_id(piece[0])} (line {piece[0].line}): one row alone runs out "
                        f"of device memory ({_first_line(e)}); lower --gpu-memory or --prefetch"
                    ) from None
                self.max_rows = len(piece) // 2
                log.warning(
                    "a batch of %d rows ran out of device memory: halving it to %d rows and "
                    "going on (lower --batch-size to skip this retry)",
                    len(piece),
                    self.max_rows,
                )
                _free_device_cache()
        return out


def _id(r: Request) -> str:
    return json.dumps(r.id)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:160]


def _free_device_cache() -> None:
    """Hand the failed attempt's cached blocks back, so the halves start from a clean pool."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
