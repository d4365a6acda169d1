"""The continuous-refill Scheduler: records stream through `Model.generate_stream`, a finished
row's place going to the next record, whose prefill shares the weight pass with the other rows'
decode. Rows are yielded in groups of `group_rows` as they finish (each group is written and
fsynced by the job loop before the next is asked for)."""

from __future__ import annotations

import math
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from zeroinf.engine.refill import Request as EngineRequest
from zeroinf.jobs.batching import Row, sampling_groups
from zeroinf.jobs.records import Key, Request


@dataclass
class RefillScheduler:
    model: Any  # zeroinf.api.Model
    batch_size: int  # rows in flight
    eos: Sequence[int] = ()
    group_rows: int = 0  # finished rows per yielded group; 0: batch_size

    def _todo(self, requests: Sequence[Request], done: Container[Key]) -> list[Request]:
        return [r for r in requests if r.key not in done]

    def total_batches(self, requests: Sequence[Request], done: Container[Key]) -> int:
        todo = self._todo(requests, done)
        per = self.group_rows or self.batch_size
        return sum(math.ceil(len(g) / per) for g in sampling_groups(todo).values())

    def run(self, requests: Sequence[Request], done: Container[Key]) -> Iterator[list[Row]]:
        per = self.group_rows or self.batch_size
        for s, group in sampling_groups(self._todo(requests, done)).items():
            # greedy rows need no seed; sampled rows carry their record's own (a row's tokens
            # then do not depend on which records share the batch, or on a resumed job's order)
            reqs = [EngineRequest(list(r.prompt_ids), r.max_new_tokens, r.seed, r) for r in group]
            stream = self.model.generate_stream(
                reqs, batch_size=self.batch_size, do_sample=not s.greedy,
                temperature=s.temperature if not s.greedy else 1.0, top_k=s.top_k,
                top_p=s.top_p, eos_token_id=list(self.eos) or None,
            )  # fmt: skip
            rows: list[Row] = []
            for req, tokens in stream:
                rows.append((req.key, tokens))
                if len(rows) == per:
                    yield rows
                    rows = []
            if rows:
                yield rows
