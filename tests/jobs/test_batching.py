"""Static batches: every request exactly once, equal sampling within a batch, lengths that fit
the model, and a resumed job forms the same batches and re-runs a half-written one whole."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from zeroinf.jobs.batching import StaticBatcher, plan_batches
from zeroinf.jobs.records import Request, Sampling

SAMPLINGS = [Sampling(), Sampling(0.7), Sampling(0.7, 5, 0.9)]


def requests(n: int, seed: int = 0) -> list[Request]:
    rng = random.Random(seed)
    return [
        Request(i, i + 1, f"r{i}", tuple(range(rng.randint(1, 20))), rng.randint(1, 25),
                rng.choice(SAMPLINGS), i)
        for i in range(n)
    ]  # fmt: skip


@pytest.mark.parametrize("bs,max_pos", [(1, 70), (3, 70), (8, 45), (64, 1000)])
@pytest.mark.parametrize("seed", [0, 1])
def test_plan_invariants(bs: int, max_pos: int, seed: int) -> None:
    reqs = requests(50, seed)
    batches = plan_batches(reqs, bs, max_pos)
    flat = [r.id for b in batches for r in b]
    assert sorted(flat) == sorted(r.id for r in reqs) and len(flat) == len(set(flat))
    for b in batches:
        assert 1 <= len(b) <= bs
        assert len({r.sampling for r in b}) == 1
        assert max(len(r.prompt_ids) for r in b) + max(r.max_new_tokens for r in b) <= max_pos
        lens = [len(r.prompt_ids) for r in b]
        assert lens == sorted(lens)  # similar lengths together: little padding
    # a pure function of the requests, in any order
    shuffled = random.Random(seed).sample(reqs, len(reqs))
    again = [[r.id for r in b] for b in plan_batches(shuffled, bs, max_pos)]
    assert sorted(again) == sorted([r.id for r in b] for b in batches)


class FakeGenerate:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, batch: Sequence[Request]) -> list[list[int]]:
        self.calls.append([str(r.id) for r in batch])
        return [[r.index] * r.max_new_tokens for r in batch]


def test_static_batcher_skips_done_and_reruns_partial_batches_whole() -> None:
    reqs = requests(20)
    batches = plan_batches(reqs, 4, 1000)
    full, half = batches[0], batches[1]
    done = {r.key for r in full} | {half[0].key}
    gen = FakeGenerate()
    sched = StaticBatcher(gen, 4, 1000)
    assert sched.total_batches(reqs, done) == len(batches) - 1
    rows = [row for group in sched.run(reqs, done) for row in group]
    assert gen.calls == [[str(r.id) for r in b] for b in batches[1:]]  # the half one whole
    assert sorted(r.id for r, _ in rows) == sorted(r.id for r in reqs if r.key not in done)
    assert all(new == [r.index] * r.max_new_tokens for r, new in rows)
