"""A CUDA out-of-memory error in the executor (simulated in-process: the model's layer raises
torch.cuda.OutOfMemoryError for batches above N rows). The batch job halves its batch and goes
on, says so in its log, and writes exactly what an unbroken run writes; a single row that does
not fit ends the job with one line naming the record, every finished record kept."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fault_helpers import Job, open_fds, record_cases, results

import zeroinf.models.llama as llama
from zeroinf.cli.generate import main

HALVING = (
    "a batch of {} rows ran out of device memory: halving it to {} rows and going on "
    "(lower --batch-size to skip this retry)"
)


def run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out + err


class OOMAbove:
    """Wraps the family's layer: rows > limit raise an OOM before computing (on every pass)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.real, self.raised, self.rows = limit, llama.layer, 0, []

    def __call__(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        self.rows.append(x.shape[0])
        if x.shape[0] > self.limit:
            self.raised += 1
            raise torch.cuda.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (simulated)"
            )
        return self.real(x, *args)


@pytest.fixture(scope="module")
def unbroken(job: Job, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The job at --batch-size 8 in this process, without faults (this process's threads)."""
    out = tmp_path_factory.mktemp("oom") / "unbroken.jsonl"
    assert main(job.args(out, "--batch-size", "8")) == 0
    ref = results(out)
    assert ref == job.reference  # batch size does not change a record's output
    return ref


@pytest.fixture
def oom(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], OOMAbove]:
    """oom(limit): from now until the test ends, layers of more than `limit` rows fail."""

    def install(limit: int) -> OOMAbove:
        o = OOMAbove(limit)
        monkeypatch.setattr(llama, "layer", o)
        return o

    return install


def test_batch_halves_and_goes_on(
    job: Job,
    unbroken: dict,
    oom: Callable[[int], OOMAbove],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fds = open_fds()
    o = oom(3)  # batches of 8 and 4 rows run out of memory; 2 rows fit
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.WARNING, logger="zeroinf"):
        code, text = run_cli(capsys, job.args(out, "--batch-size", "8"))
    assert code == 0, text
    assert results(out) == unbroken
    said = [r.getMessage() for r in caplog.records if "ran out of device memory" in r.message]
    assert said == [HALVING.format(8, 4), HALVING.format(4, 2)]  # once: 2 rows from then on
    assert o.raised == 2 and max(o.rows) == 8 and max(o.rows[o.rows.index(4) + 1 :]) == 2
    assert "23 ok, 2 failed, 0 already done of 25 records" in text
    assert open_fds() == fds
    record_cases("OOM above N rows -> batch halved", 1)


def test_a_row_that_never_fits_ends_the_job_cleanly(
    job: Job,
    unbroken: dict,
    oom: Callable[[int], OOMAbove],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out.jsonl"
    oom(0)
    code, text = run_cli(capsys, job.args(out, "--batch-size", "4"))
    assert code == 2, text
    lines = [x for x in text.splitlines() if x.startswith("zeroinf-generate: error: ")]
    assert "Traceback" not in text and len(lines) == 1, text
    m = re.fullmatch(
        r'zeroinf-generate: error: record "(r\d+)" \(line (\d+)\): one row alone runs out of '
        r"device memory \(CUDA out of memory\. Tried to allocate 2\.00 GiB \(simulated\)\); "
        r"lower --gpu-memory or --prefetch",
        lines[0],
    )
    assert m, lines[0]
    named = json.loads(job.input.read_text().splitlines()[int(m[2]) - 1])
    assert named["id"] == m[1]  # the message names the record and its line
    assert results(out) == {k: v for k, v in unbroken.items() if "error" in v}  # kept: errors
    record_cases("OOM at 1 row -> one-line error", 1)


def test_oom_then_resume(
    job: Job,
    unbroken: dict,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job that ended on an OOM resumes, once the memory is there, to the unbroken output."""
    out = tmp_path / "out.jsonl"
    with monkeypatch.context() as m:
        m.setattr(llama, "layer", OOMAbove(0))
        assert run_cli(capsys, job.args(out, "--batch-size", "4"))[0] == 2
    code, text = run_cli(capsys, job.args(out, "--batch-size", "4"))
    assert code == 0, text
    assert results(out) == unbroken
    record_cases("OOM, then resume", 1)
