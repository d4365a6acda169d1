"""The refill Scheduler yields every record once, with the tokens one-at-a-time generate()
gives it (greedy), or its own seed gives it (sampled), whatever the batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zeroinf
from zeroinf.convert import convert
from zeroinf.jobs.records import Request, Sampling
from zeroinf.jobs.refill import RefillScheduler
from zeroinf.tiny import save_tiny_hf


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("refill-job")
    save_tiny_hf(d / "hf", "llama", seed=31, tokenizer=False)
    return Path(convert(d / "hf", d / "zi", progress=False))


def records(n: int, sampling: Sampling) -> list[Request]:
    g = torch.Generator().manual_seed(8)
    out = []
    for i in range(n):
        ids = tuple(torch.randint(4, 384, (int(torch.randint(1, 9, (1,), generator=g)),),
                                  generator=g).tolist())  # fmt: skip
        new = int(torch.randint(1, 8, (1,), generator=g))
        out.append(Request(i, i + 1, f"r{i}", ids, new, sampling, seed=1000 + i))
    return out


def test_refill_rows_equal_one_at_a_time_and_skip_done(model_path: Path) -> None:
    reqs = records(10, Sampling())
    done = {reqs[2].key, reqs[5].key}
    with zeroinf.load(model_path, device="cpu", gpu_memory=None) as model:
        sched = RefillScheduler(model, batch_size=3, group_rows=2)
        groups = list(sched.run(reqs, done))
        assert len(groups) == sched.total_batches(reqs, done) == 4
        got = {r.key: toks for g in groups for r, toks in g}
        want = {}
        for r in reqs:
            out = model.generate(torch.tensor([r.prompt_ids]), max_new_tokens=r.max_new_tokens)
            want[r.key] = out[0, len(r.prompt_ids) :].tolist()
    assert set(got) == {r.key for r in reqs} - done  # every record once, the done ones skipped
    assert got == {k: v for k, v in want.items() if k in got}


def test_refill_sampled_rows_follow_their_seed(model_path: Path) -> None:
    reqs = records(8, Sampling(temperature=0.8, top_p=0.9))
    with zeroinf.load(model_path, device="cpu", gpu_memory=None) as model:
        a = {r.key: t for g in RefillScheduler(model, 3).run(reqs, set()) for r, t in g}
        b = {r.key: t for g in RefillScheduler(model, 2).run(reqs[::-1], set()) for r, t in g}
    assert a == b
