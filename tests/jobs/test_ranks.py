"""Sharing records among ranks: disjoint shares that cover the input, part files beside the
output, and rank 0's wait for the others' records."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from zeroinf.jobs.output import merge, scan
from zeroinf.jobs.ranks import Ranks, done_keys, existing_parts, part_path, shard, wait_for
from zeroinf.jobs.records import JobError, id_key, parse_lines


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shards_are_disjoint_and_cover(world: int) -> None:
    recs = parse_lines([json.dumps({"id": i, "prompt": "w1"}) for i in range(23)] + ["{bad"])
    shares = [shard(recs, r, world) for r in range(world)]
    ids = [rec.index for s in shares for rec in s]
    assert sorted(ids) == list(range(24))
    assert all(len(s) in (len(recs) // world, len(recs) // world + 1) for s in shares)


def test_ranks_from_env_and_paths(tmp_path: Path) -> None:
    assert Ranks.from_env({}) == Ranks(0, 1)
    assert Ranks.from_env({"RANK": "2", "WORLD_SIZE": "4"}) == Ranks(2, 4)
    with pytest.raises(JobError, match="RANK=4"):
        Ranks.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    out = tmp_path / "res.jsonl"
    assert part_path(out, 0, 1) == out
    assert part_path(out, 3, 4) == tmp_path / "res.jsonl.rank3"
    for name in ("res.jsonl.rank10", "res.jsonl.rank2", "res.jsonl.rankx", "res.jsonl.rank2.bak"):
        (tmp_path / name).write_text("")
    assert [p.name for p in existing_parts(out)] == ["res.jsonl.rank2", "res.jsonl.rank10"]


def line(i: int) -> str:
    return json.dumps({"id": i, "text": "", "token_ids": [], "finish_reason": "length",
                       "usage": {"prompt_tokens": 1, "completion_tokens": 0}}) + "\n"  # fmt: skip


def test_wait_for_the_other_ranks_then_merge(tmp_path: Path) -> None:
    out = tmp_path / "res.jsonl"
    part_path(out, 0, 2).write_text(line(0) + line(2))
    part_path(out, 1, 2).write_text(line(1))
    expected = {id_key(i) for i in range(4)}
    assert done_keys(out) == {id_key(i) for i in range(3)}
    with pytest.raises(JobError, match="1 record"):
        wait_for(out, expected, poll_s=0.01, timeout_s=0.05)

    def rank1_finishes() -> None:
        time.sleep(0.1)
        with open(part_path(out, 1, 2), "a") as f:
            f.write(line(3))

    t = threading.Thread(target=rank1_finishes)
    t.start()
    wait_for(out, expected, poll_s=0.01, timeout_s=30)
    t.join()
    assert merge(out, existing_parts(out)) == 4
    assert sorted(o["id"] for o in scan(out)[0]) == [0, 1, 2, 3] and not existing_parts(out)
