"""Hostile input records through a real job: each gets its error line (or a correct result) and
the job goes on to the end; a rerun finds every record done. Lines that once crashed the job:
nesting past the JSON parser's recursion limit, integers past Python's 4300-digit limit, lone
surrogate escapes that cannot be written back as UTF-8, integers past the float range."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import record_cases, results

from zeroinf.cli.generate import main
from zeroinf.jobs.records import id_key, line_key

BIG = "9" * 5000
LINES: list[tuple[str, dict[str, Any] | None]] = [
    # (input line, its expected output line; None: a result line, checked separately)
    ("[" * 100_000, {"id": None, "line": 1, "error": "line 1: not valid JSON (nested too deeply)"}),
    (f'{{"id": {BIG}, "prompt": "w1"}}', {"id": None, "line": 2, "error": "line 2: not valid "
     "JSON (Exceeds the limit (4300 digits) for integer string conversion)"}),
    ('{"id": "\\ud800", "prompt": "w1"}', {"id": None, "line": 3, "error": "line 3: text holds "
     "\\ud800, a lone surrogate escape (not valid Unicode)"}),
    ('{"id": "m", "prompt": "w1", "meta": ' + "[" * 70 + "]" * 70 + "}", {"id": None, "line": 4,
     "error": "line 4: nested deeper than 64 levels"}),
    ('{"id": "t", "prompt": "w1", "temperature": 1' + "0" * 400 + "}", {"id": "t", "error":
     'line 5: "temperature" must be a number >= 0 (0 = greedy)'}),
    ('{"id": "v", "input_ids": [1, 100000000000000000000000000000]}', {"id": "v", "error":
     "line 6: input_ids: token 100000000000000000000000000000 is outside the vocabulary of 384"}),
    ('{"id": "k", "prompt": "w1", "top_k": ' + "9" * 300 + ", \"temperature\": 0.5}", None),
    ('{"id": ' + "7" * 4000 + ', "prompt": "w1 w2"}', None),
    ('{"id": "u", "prompt": "w3 \\u202e\\u200b \\ud83d\\ude00 w4", "meta": {"\\u0000": [1e308]}}',
     None),
]  # fmt: skip


def test_hostile_records_get_error_lines_and_the_job_goes_on(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes("".join(line + "\n" for line, _ in LINES).encode() + b'{"id": "\xff"}\n')
    out = tmp_path / "out.jsonl"
    argv = ["--model", str(ckpt), "--input", str(inp), "--output", str(out), "--device", "cpu",
            "--max-new-tokens", "3", "--quiet"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr()
    got = results(out)
    n = len(LINES) + 1
    assert len(got) == n  # one line per record, none repeated
    for i, (_, want) in enumerate(LINES, start=1):
        if want is None:
            continue
        key = line_key(i) if "line" in want else id_key(want["id"])
        assert got[key] == want
    assert got[line_key(n)]["error"].startswith(f"line {n}: not valid JSON")  # not UTF-8
    for rid in ("k", int("7" * 4000), "u"):
        assert got[id_key(rid)]["finish_reason"] == "length"
        assert len(got[id_key(rid)]["token_ids"]) == 3
    assert got[id_key("u")]["meta"] == {"\x00": [1e308]}
    assert "3 ok, 7 failed, 0 already done of 10 records" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 ok, 0 failed, 10 already done of 10 records" in capsys.readouterr().out
    record_cases("hostile JSONL records through a job", n)


def test_tiny_temperature_is_not_a_poison_record(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "tiny", "prompt": "w1 w2", "temperature": 1e-40}) + "\n")
    out = tmp_path / "out.jsonl"
    code = main(["--model", str(ckpt), "--input", str(inp), "--output", str(out),
                 "--device", "cpu", "--max-new-tokens", "3", "--quiet"])  # fmt: skip
    capsys.readouterr()
    assert code == 0 and len(results(out)) == 1
