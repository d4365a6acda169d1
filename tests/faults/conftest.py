"""Fixtures for tests/faults: a converted tiny checkpoint, CLI processes, and a batch job with its
uninterrupted results (the oracle every faulted run must reproduce exactly)."""

from __future__ import annotations

import json
import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fault_helpers import N_RECORDS, PRELOAD, Job, Procs, results

from zeroinf.convert import convert


@pytest.fixture(scope="session")
def ckpt(tiny_hf: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama converted (5 units: embed, 3 layers, head). Read-only: copy to modify."""
    return Path(convert(tiny_hf("llama"), tmp_path_factory.mktemp("faults") / "zi", progress=False))


@pytest.fixture(scope="session")
def procs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Procs]:
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the forkserver when it imports torch
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD)
    try:
        yield Procs(tmp_path_factory.mktemp("procs"))
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


@pytest.fixture(scope="session")
def job(ckpt: Path, procs: Procs, tmp_path_factory: pytest.TempPathFactory) -> Job:
    folder = tmp_path_factory.mktemp("job")
    recs: list[Any] = [
        {"id": f"r{i}", "prompt": " ".join(f"w{(11 * i + j) % 300}" for j in range(1 + i % 7))}
        for i in range(N_RECORDS)
    ]
    recs[5] = {"id": "r5", "prompt": ""}  # an error line must also appear exactly once
    recs.insert(9, "{broken")
    inp = folder / "in.jsonl"
    inp.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    argv = ["--model", str(ckpt), "--input", str(inp), "--device", "cpu", "--batch-size", "2",
            "--max-new-tokens", "16", "--temperature", "0.9", "--top-k", "50", "--seed", "7",
            "--quiet"]  # fmt: skip
    out = folder / "reference.jsonl"
    code, log = procs.run("generate", [*argv, "--output", str(out)])
    assert code == 0, log
    ref = results(out)
    assert len(ref) == N_RECORDS + 1  # 23 results, the empty prompt's and the broken line's
    return Job(inp, argv, ref)
