"""Input records: every accepted shape parses, every bad one becomes an error naming its line,
and a record's seed depends only on the job seed and its id."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from zeroinf.jobs.records import (
    BadRecord,
    Defaults,
    RawRecord,
    Request,
    Sampling,
    parse_lines,
    prepare,
    read_input,
    record_seed,
)


def lines(*objs: object) -> list[str]:
    return [o if isinstance(o, str) else json.dumps(o) for o in objs]


def test_good_records_parse() -> None:
    got = parse_lines(lines(
        {"id": "a", "prompt": "w1 w2"},
        "",
        {"id": 7, "messages": [{"role": "user", "content": "w3"}], "temperature": 0.5},
        {"id": "c", "input_ids": [4, 5], "max_new_tokens": 3, "stop": "w9", "meta": [1]},
    ))  # fmt: skip
    assert all(isinstance(r, RawRecord) for r in got)
    a, b, c = got
    assert (a.index, a.line, a.id, a.prompt) == (0, 1, "a", "w1 w2")
    assert (b.index, b.line, b.id, b.options) == (1, 3, 7, {"temperature": 0.5})
    assert b.messages == ({"role": "user", "content": "w3"},)
    assert (c.input_ids, c.options["stop"], c.meta) == ((4, 5), ("w9",), [1])


BAD = [
    ("{oops", None, "not valid JSON", True),
    ("[1, 2]", None, "not a JSON object", True),
    ({"prompt": "w1"}, None, '"id" missing', True),
    ({"id": 1.5, "prompt": "w1"}, 1.5, "not a string or integer", True),
    ({"id": True, "prompt": "w1"}, True, "not a string or integer", True),
    ({"id": "e", "prompt": "   "}, "e", "empty prompt", False),
    ({"id": "e", "input_ids": []}, "e", "empty prompt", False),
    ({"id": "e", "input_ids": [1, -2]}, "e", "non-negative integers", False),
    ({"id": "e", "prompt": "w1", "input_ids": [1]}, "e", "exactly one of", False),
    ({"id": "e"}, "e", "exactly one of", False),
    ({"id": "e", "messages": []}, "e", '"messages" must be', False),
    ({"id": "e", "messages": [{"content": "x"}]}, "e", '"messages" must be', False),
    ({"id": "e", "prompt": "w1", "max_tokens": 3}, "e", "unknown field 'max_tokens'", False),
    ({"id": "e", "prompt": "w1", "max_new_tokens": 0}, "e", "max_new_tokens", False),
    ({"id": "e", "prompt": "w1", "temperature": -1}, "e", "temperature", False),
    ({"id": "e", "prompt": "w1", "top_p": 0}, "e", "top_p", False),
    ({"id": "e", "prompt": "w1", "top_k": 1.5}, "e", "top_k", False),
    ({"id": "e", "prompt": "w1", "seed": "x"}, "e", "seed", False),
    ({"id": "e", "prompt": "w1", "stop": [""]}, "e", "stop", False),
]


@pytest.mark.parametrize("obj,rid,msg,by_line", BAD)
def test_bad_records_name_their_line(obj: object, rid: object, msg: str, by_line: bool) -> None:
    ok = {"id": "ok", "prompt": "w1"}
    got = parse_lines(lines(ok, obj, ok | {"id": "ok2"}))
    assert isinstance(got[0], RawRecord) and isinstance(got[2], RawRecord)  # the job goes on
    bad = got[1]
    assert isinstance(bad, BadRecord)
    assert bad.error.startswith("line 2: ") and msg in bad.error, bad.error
    assert (bad.id, bad.by_line) == (rid, by_line)
    out = bad.to_json()
    assert out["error"] == bad.error and out["id"] == rid and ("line" in out) == by_line


def test_duplicate_ids_keep_the_first() -> None:
    got = parse_lines(lines({"id": 1, "prompt": "w1"}, {"id": "1", "prompt": "w2"},
                            {"id": 1, "prompt": "w3"}))  # fmt: skip
    assert [type(r) for r in got] == [RawRecord, RawRecord, BadRecord]  # 1 and "1" differ
    assert got[2].error == "line 3: duplicate id 1 (first on line 1)"
    assert got[2].key == ("line", "3") and got[0].key == ("id", "1")


def test_read_input_survives_bad_bytes(tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"id": 1, "prompt": "w1"}\n\xff\xfe\n{"id": 2, "prompt": "w2"}')
    got = read_input(str(f))
    assert [type(r) for r in got] == [RawRecord, BadRecord, RawRecord]
    assert got[1].error.startswith("line 2: not valid JSON")


def test_record_seed_depends_on_seed_and_id_only() -> None:
    assert record_seed(0, "a") == record_seed(0, "a")
    seeds = {record_seed(s, i) for s in (0, 1) for i in ("a", "b", 1, "1")}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)


def test_greedy_sampling_ignores_top_k_top_p() -> None:
    assert Sampling(0.0, 5, 0.5) == Sampling()
    assert Sampling(0.7, 5, 0.5) != Sampling(0.7)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, 0, 1.5)


@pytest.fixture(scope="module")
def tok(tiny_hf: Callable[..., Path]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_hf("llama")), local_files_only=True)


def test_prepare_tokenizes_and_resolves(tok) -> None:
    raw = parse_lines(lines(
        {"id": "p", "prompt": "w1 w2 w3"},
        {"id": "m", "messages": [{"role": "user", "content": "w5"}], "seed": 9, "top_k": 4,
         "temperature": 0.5},
        {"id": "i", "input_ids": [7, 8], "max_new_tokens": 2},
        {"id": "v", "input_ids": [7, 384]},
        {"id": "l", "prompt": "w1 " * 60},
    ))  # fmt: skip
    d = Defaults(max_new_tokens=5, sampling=Sampling(0.8, 0, 0.9), seed=3, stop=("w4",))
    p, m, i, v, long = (prepare(r, tok, d, max_positions=64, vocab_size=384) for r in raw)
    assert isinstance(p, Request) and p.prompt_ids == tuple(tok("w1 w2 w3")["input_ids"])
    assert (p.max_new_tokens, p.sampling, p.seed, p.stop) == (5, d.sampling, record_seed(3, "p"),
                                                               ("w4",))  # fmt: skip
    chat = tok.apply_chat_template([{"role": "user", "content": "w5"}], add_generation_prompt=True,
                                   tokenize=False)  # fmt: skip
    assert m.prompt_ids == tuple(tok(chat, add_special_tokens=False)["input_ids"])
    assert (m.seed, m.sampling) == (9, Sampling(0.5, 4, 0.9))
    assert (i.prompt_ids, i.max_new_tokens) == ((7, 8), 2)
    assert isinstance(v, BadRecord) and "outside the vocabulary of 384" in v.error
    assert isinstance(long, BadRecord)
    assert long.error == ("line 5: prompt of 60 tokens + max_new_tokens 5 exceeds the model's 64 "
                          "positions")  # fmt: skip
    # --chat renders a plain prompt as one user message
    chat_p = prepare(raw[0], tok, Defaults(max_new_tokens=5, chat=True), 64, 384)
    text = tok.apply_chat_template([{"role": "user", "content": "w1 w2 w3"}],
                                   add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert chat_p.prompt_ids == tuple(tok(text, add_special_tokens=False)["input_ids"])
    # without a tokenizer only input_ids records run
    assert isinstance(prepare(raw[0], None, d, 64, 384), BadRecord)
    assert isinstance(prepare(raw[2], None, d, 64, 384), Request)
