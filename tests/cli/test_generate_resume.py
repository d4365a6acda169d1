"""zeroinf-generate killed for real: SIGKILL at random points (several trials) and SIGINT /
SIGTERM, each resumed, yields every id exactly once with results equal to an uninterrupted run.

The jobs run as separate processes forked from a server that imported torch once (a fresh
interpreter per run would spend most of the test importing)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from zeroinf.convert import convert
from zeroinf.jobs.output import output_key, scan

N_RECORDS = 24
# What a job imports, so that each forked job starts in a fraction of a second (the server
# skips a module that this transformers version does not have).
PRELOAD = [
    "zeroinf.api", "zeroinf.cli.generate", "zeroinf.jobs", "transformers", "tokenizers", "jinja2",
    "transformers.models.auto.tokenization_auto", "transformers.tokenization_utils_tokenizers",
    "transformers.tokenization_utils_fast", "transformers.convert_slow_tokenizer",
    "transformers.generation", "transformers.models.auto.modeling_auto",
    "transformers.models.llama.configuration_llama",
]  # fmt: skip


def child(argv: list[str], log: str) -> None:
    """A job process: stdout and stderr into `log`, exit status = the CLI's."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from zeroinf.cli.generate import main

    try:
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    raise SystemExit(code)


class Jobs:
    def __init__(self, ckpt: Path, folder: Path) -> None:
        self.ctx = multiprocessing.get_context("forkserver")
        self.folder = folder
        recs: list[Any] = [
            {"id": f"r{i}", "prompt": " ".join(f"w{(11 * i + j) % 300}" for j in range(1 + i % 7))}
            for i in range(N_RECORDS)
        ]
        recs[5] = {"id": "r5", "prompt": ""}  # an error line must also appear exactly once
        recs.insert(9, "{broken")
        self.input = folder / "in.jsonl"
        self.input.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                      for r in recs))  # fmt: skip
        self.argv = ["--model", str(ckpt), "--input", str(self.input), "--device", "cpu",
                     "--batch-size", "2", "--max-new-tokens", "16", "--temperature", "0.9",
                     "--top-k", "50", "--seed", "7", "--quiet"]  # fmt: skip
        self.n = 0

    def start(self, out: Path) -> multiprocessing.process.BaseProcess:
        self.n += 1
        log = str(self.folder / f"run{self.n}.log")
        p = self.ctx.Process(target=child, args=([*self.argv, "--output", str(out)], log))
        p.start()
        p.log = log  # type: ignore[attr-defined]
        return p

    def run(self, out: Path) -> int:
        p = self.start(out)
        p.join(120)
        return p.exitcode


@pytest.fixture(scope="module")
def jobs(tiny_hf: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobs]:
    folder = tmp_path_factory.mktemp("resume")
    ckpt = Path(convert(tiny_hf("llama"), folder / "zi", progress=False))
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the server when it imports torch
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    try:
        yield Jobs(ckpt, folder)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


def results(path: Path) -> dict[tuple[str, str], dict]:
    """Every line of a finished output by key; asserts the file is whole and has no repeats."""
    lines, size = scan(path)
    assert size == path.stat().st_size, "torn tail"
    keys = [output_key(o) for o in lines]
    assert len(keys) == len(set(keys)), "a record was written twice"
    return dict(zip(keys, lines, strict=True))


@pytest.fixture(scope="module")
def reference(jobs: Jobs) -> dict:
    out = jobs.folder / "reference.jsonl"
    assert jobs.run(out) == 0, Path(jobs.folder / "run1.log").read_text()
    ref = results(out)
    assert len(ref) == N_RECORDS + 1  # 23 results, the empty prompt's and the broken line's errors
    return ref


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("trial", [0, 1])
def test_sigkill_at_random_points_then_resume(jobs: Jobs, reference: dict, trial: int) -> None:
    rng = random.Random(1000 + trial)
    out = jobs.folder / f"killed{trial}.jsonl"
    kills = 0
    while True:
        have = count_lines(out)
        # kill once the output has grown past a random point, after a random extra moment, so
        # the kill lands in generation, between batches, or in the middle of a write
        target = rng.randint(have + 1, max(have + 1, len(reference) - 8)) if kills < 3 else None
        p = jobs.start(out)
        while target is not None and p.is_alive() and count_lines(out) < target:
            time.sleep(0.002)
        if target is not None and p.is_alive():
            time.sleep(rng.uniform(0, 0.03))
            p.kill()
        p.join(120)
        if p.exitcode == 0:
            break
        assert p.exitcode == -signal.SIGKILL, Path(p.log).read_text()
        kills += 1
    assert kills >= 1
    assert results(out) == reference


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_exits_cleanly_and_resumes(jobs: Jobs, reference: dict, sig: int,
                                             code: int) -> None:  # fmt: skip
    out = jobs.folder / f"interrupted{sig}.jsonl"
    p = jobs.start(out)
    while p.is_alive() and count_lines(out) < 6:
        time.sleep(0.002)
    os.kill(p.pid, sig)
    p.join(120)
    log = Path(p.log).read_text()
    assert p.exitcode == code, log
    summary = [x for x in log.splitlines() if x.startswith("zeroinf-generate: ")]
    assert len(summary) == 1 and "rerun the same command to resume" in summary[0], log
    assert "Traceback" not in log
    partial = results(out)  # whole lines only, no repeats
    assert 0 < len(partial) < len(reference)
    assert all(reference[k] == v for k, v in partial.items())
    assert jobs.run(out) == 0
    assert results(out) == reference
