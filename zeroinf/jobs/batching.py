"""Turning requests into forward passes. The job loop only consumes a Scheduler's finished rows;
the static batcher here is one Scheduler, a continuous-refill scheduler (new prompts taking the
places of finished rows inside the executor) is meant to be another."""

from __future__ import annotations

from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from zeroinf.jobs.records import Key, Request, Sampling

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


@dataclass
class StaticBatcher:
    """Fixed batches: a batch runs until its last row is done, then the next one starts."""

    generate: GenerateFn
    batch_size: int
    max_positions: int

    def _todo(self, requests: Sequence[Request], done: Container[Key]) -> list[list[Request]]:
        batches = plan_batches(requests, self.batch_size, self.max_positions)
        return [b for b in batches if any(r.key not in done for r in b)]

    def total_batches(self, requests: Sequence[Request], done: Container[Key]) -> int:
        return len(self._todo(requests, done))

    def run(self, requests: Sequence[Request], done: Container[Key]) -> Iterator[list[Row]]:
        for batch in self._todo(requests, done):
            # A batch that a crash left half-written runs whole again, so that its rows see the
            # same batch-mates as in an uninterrupted run; only its missing rows are yielded.
            new = self.generate(batch)
            yield [(r, t) for r, t in zip(batch, new, strict=True) if r.key not in done]
