"""Fuzzed zeroinf-generate input: JSONL lines of any text and objects of random keys and values
(unicode, lone surrogates, huge numbers, NaN, deep nesting) through the record parser, the
tokenizing step and a whole job (a stand-in model). Every record ends as a correct Request or an
error line naming its line; every error line can be written back; a job writes exactly one line
per record and a rerun writes none; nothing else is raised, nothing hangs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from fuzz_helpers import FUZZ, count, texts, values
from hypothesis import given
from hypothesis import strategies as st

from zeroinf.jobs import (
    BadRecord,
    Defaults,
    JobConfig,
    Request,
    StaticBatcher,
    parse_lines,
    prepare,
    read_input,
    run_job,
)
from zeroinf.jobs.output import output_key, scan
from zeroinf.jobs.records import CONTENT_FIELDS, FIELDS, RawRecord, parse_line

MAX_POSITIONS, VOCAB = 64, 384

field_values = (
    values
    | st.lists(st.integers(-5, 500), max_size=6)
    | st.lists(st.fixed_dictionaries({"role": texts, "content": texts}), max_size=3)
)
records = st.dictionaries(st.sampled_from(FIELDS) | texts, field_values, max_size=6)


def check_parsed(rec: Any, line: int) -> None:
    """What the job may rely on for a parsed line."""
    if isinstance(rec, BadRecord):
        assert rec.error.startswith(f"line {line}: ") and "\n" not in rec.error
        json.dumps(rec.to_json(), ensure_ascii=False).encode()  # the error line can be written
        return
    assert isinstance(rec, RawRecord)
    assert isinstance(rec.id, str | int) and not isinstance(rec.id, bool) and rec.id != ""
    content = [rec.prompt, rec.messages, rec.input_ids]
    assert sum(c is not None for c in content) == 1
    o = rec.options
    assert o.get("max_new_tokens", 1) >= 1 and 0 <= o.get("seed", 0) < 2**63
    assert math.isfinite(float(o.get("temperature", 0))) and o.get("temperature", 0) >= 0
    assert 0 < o.get("top_p", 1) <= 1 and o.get("top_k", 0) >= 0
    json.dumps({"id": rec.id, "meta": rec.meta}, ensure_ascii=False).encode()


@FUZZ
@given(records, st.booleans(), st.integers(1, 10**6))
def test_parse_objects(obj: dict[str, Any], ascii_only: bool, line: int) -> None:
    count("JSONL objects of random fields")
    check_parsed(parse_line(json.dumps(obj, ensure_ascii=ascii_only), 0, line), line)


@FUZZ
@given(
    texts
    | st.text(max_size=40)
    | st.integers(40, 3000).map(lambda n: "[" * n + "]" * n)
    | st.integers(4200, 4400).map(lambda n: '{"id": 1, "prompt": "x", "seed": ' + "9" * n + "}")
)
def test_parse_any_line(text: str) -> None:
    count("JSONL lines of any text")
    check_parsed(parse_line(text, 0, 7), 7)


valid_records = st.fixed_dictionaries(
    {
        "id": st.integers(-(10**30), 10**30) | st.text(min_size=1, max_size=10),
        "prompt": st.text(st.characters(codec="utf-8"), min_size=1, max_size=20).filter(
            lambda s: s.strip() != ""
        ),
    },
    optional={
        "max_new_tokens": st.integers(1, 10**9),
        "temperature": st.floats(0, 1e6),
        "top_k": st.integers(0, 10**6),
        "top_p": st.floats(1e-9, 1.0),
        "seed": st.integers(0, 2**63 - 1),
        "stop": st.text(st.characters(codec="utf-8"), min_size=1, max_size=4),
        "meta": st.recursive(
            st.none() | st.integers() | st.text(st.characters(codec="utf-8"), max_size=4),
            lambda x: st.lists(x, max_size=3) | st.dictionaries(st.text(max_size=3), x),
            max_leaves=6,
        ),
    },
)


@FUZZ
@given(valid_records)
def test_valid_records_parse_exactly(obj: dict[str, Any]) -> None:
    count("valid JSONL records -> exact RawRecord")
    rec = parse_line(json.dumps(obj, ensure_ascii=False), 3, 4)
    assert isinstance(rec, RawRecord), rec
    assert (rec.index, rec.line, rec.id, rec.prompt) == (3, 4, obj["id"], obj["prompt"])
    assert rec.meta == obj.get("meta")
    want = {k: obj[k] for k in ("max_new_tokens", "temperature", "top_k", "top_p", "seed")
            if k in obj}  # fmt: skip
    if "stop" in obj:
        want["stop"] = (obj["stop"],)
    assert rec.options == want


@FUZZ
@given(st.lists(st.binary(max_size=30) | texts.map(lambda t: t.encode("utf-8", "replace")),
                max_size=8))  # fmt: skip
def test_read_input_bytes(tmp_path_factory: pytest.TempPathFactory, lines: list[bytes]) -> None:
    count("JSONL files of random bytes")
    path = tmp_path_factory.getbasetemp() / "bytes.jsonl"
    path.write_bytes(b"\n".join(lines))
    parsed = read_input(str(path))
    decoded = []
    for raw in b"\n".join(lines).split(b"\n"):
        try:
            decoded.append(raw.decode())
        except UnicodeDecodeError:
            decoded.append("x")
    assert len(parsed) == sum(bool(t.strip()) for t in decoded)
    for rec in parsed:
        check_parsed(rec, rec.line)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    from zeroinf.tiny import save_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(folder, VOCAB)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@FUZZ
@given(records | valid_records, st.booleans())
def test_prepare(tok: Any, obj: dict[str, Any], chat: bool) -> None:
    count("records through tokenizing and settings (prepare)")
    rec = parse_line(json.dumps(obj), 0, 5)
    if isinstance(rec, BadRecord):
        return
    out = prepare(rec, tok, Defaults(max_new_tokens=8, chat=chat), MAX_POSITIONS, VOCAB)
    if isinstance(out, BadRecord):
        check_parsed(out, 5)
        return
    assert isinstance(out, Request)
    assert out.prompt_ids and all(0 <= t < VOCAB for t in out.prompt_ids)
    assert len(out.prompt_ids) + out.max_new_tokens <= MAX_POSITIONS
    assert 0 <= out.seed < 2**63


class FakeModel:
    """What run_job needs of a Model: the config's two numbers and finish()."""

    config = SimpleNamespace(max_positions=MAX_POSITIONS, vocab_size=VOCAB)

    def finish(self) -> None:
        pass


def fake_generate(batch: Sequence[Request]) -> list[list[int]]:
    """A stand-in model: each row's tokens depend on that row alone."""
    return [[(sum(r.prompt_ids) + r.seed + i) % VOCAB for i in range(r.max_new_tokens)]
            for r in batch]  # fmt: skip


@FUZZ
@given(st.lists(records.map(json.dumps) | texts | valid_records.map(json.dumps), max_size=8))
def test_whole_job(tmp_path_factory: pytest.TempPathFactory, tok: Any, lines: list[str]) -> None:
    count("whole jobs over fuzzed JSONL (stand-in model)")
    folder = tmp_path_factory.getbasetemp()
    inp, out = folder / "job.jsonl", folder / "job.out.jsonl"
    inp.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    out.unlink(missing_ok=True)
    cfg = JobConfig(inp, out, Defaults(max_new_tokens=4), batch_size=3, progress=False)
    s = run_job(cfg, FakeModel(), tok, scheduler=StaticBatcher(fake_generate, 3, MAX_POSITIONS))
    written, size = scan(out)
    assert size == out.stat().st_size
    keys = [output_key(o) for o in written]
    assert len(keys) == len(set(keys)) == s.records == s.ok + s.failed
    assert {r.key for r in parse_lines(x.decode("utf-8", "replace") for x in
            inp.read_bytes().split(b"\n"))} <= set(keys) | {None}  # fmt: skip
    again = run_job(cfg, FakeModel(), tok, scheduler=StaticBatcher(fake_generate, 3,
                                                                   MAX_POSITIONS))  # fmt: skip
    assert (again.ok, again.failed, again.done_before) == (0, 0, s.records)
    assert scan(out)[0] == written


def test_content_fields_are_the_documented_ones() -> None:
    assert CONTENT_FIELDS == ("prompt", "messages", "input_ids")
