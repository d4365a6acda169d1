"""The results file: torn tails are cut off, never a line in the middle; writes never duplicate
a key; merging part files keeps each key once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from zeroinf.jobs.output import ResultWriter, merge, output_key, read_keys, scan
from zeroinf.jobs.records import JobError


def res(i: object) -> dict:
    return {"id": i, "text": f"t{i}", "token_ids": [1], "finish_reason": "length",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1}}  # fmt: skip


def dump(*objs: dict) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def test_keys() -> None:
    assert output_key(res(1)) == ("id", "1") and output_key(res("1")) == ("id", '"1"')
    assert output_key({"id": None, "line": 4, "error": "x"}) == ("line", "4")
    assert output_key({"id": "a", "error": "x"}) == ("id", '"a"')


@pytest.mark.parametrize(
    "tail", [b'{"id": 3, "te', b"\x00" * 50, b'{"id": 3}\n\x00\x00', b"garbage\n", b"[1]\n{"]
)
def test_torn_tail_is_cut_off(tmp_path: Path, tail: bytes) -> None:
    f = tmp_path / "out.jsonl"
    good = dump(res(1), res(2))
    f.write_bytes(good + tail)
    with ResultWriter(f) as w:
        assert w.repaired == len(tail) and w.keys == {("id", "1"), ("id", "2")}
        assert f.read_bytes() == good
        w.write([res(3)])
    assert f.read_bytes() == good + dump(res(3))


def test_bad_line_in_the_middle_is_not_repaired(tmp_path: Path) -> None:
    f = tmp_path / "out.jsonl"
    data = dump(res(1)) + b"not json\n" + dump(res(2))
    f.write_bytes(data)
    with pytest.raises(JobError, match="line 2 is not a results line"):
        ResultWriter(f)
    assert f.read_bytes() == data  # untouched
    assert [o["id"] for o in scan(f, strict=False)[0]] == [1, 2]


def test_write_skips_present_keys_and_close_cuts_a_partial_batch(tmp_path: Path) -> None:
    f = tmp_path / "out.jsonl"
    w = ResultWriter(f)
    w.write([res(1), res(2)])
    w.write([res(2), res(3), {"id": None, "line": 9, "error": "e"}])
    with open(f, "ab") as g:  # what an interrupt in the middle of a write leaves behind
        g.write(b'{"id": 4, "text"')
    w.close()
    assert [output_key(o) for o in scan(f)[0]] == [
        ("id", "1"), ("id", "2"), ("id", "3"), ("line", "9")
    ]  # fmt: skip
    assert f.read_bytes().endswith(b"\n")


def test_merge_keeps_each_key_once(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(dump(res(1)))
    p0, p1 = tmp_path / "out.jsonl.rank0", tmp_path / "out.jsonl.rank1"
    p0.write_bytes(dump(res(2), res(1)) + b'{"id": 5')  # torn tail: dropped
    p1.write_bytes(dump(res(3)))
    assert merge(out, [p0, p1]) == 3
    assert [o["id"] for o in scan(out)[0]] == [1, 2, 3]
    assert not p0.exists() and not p1.exists()
    assert not any(p.name.endswith(".merging") for p in tmp_path.iterdir())
    assert merge(out, []) == 3 and read_keys([out, p0]) == {("id", "1"), ("id", "2"), ("id", "3")}


def test_writer_creates_file(tmp_path: Path) -> None:
    f = tmp_path / "new.jsonl"
    with ResultWriter(f) as w:
        assert w.keys == set() and w.repaired == 0
    assert f.exists() and os.path.getsize(f) == 0
