"""SIGKILL and SIGINT at random points of zeroinf-convert and zeroinf-generate (real processes,
several trials each). Convert leaves a complete, valid DST or none (a SIGKILLed run may leave
DST.partial/, which no reader takes for a checkpoint and the next run removes); generate resumes
to every record exactly once, equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fault_helpers import TIMEOUT, Job, Procs, count_lines, error_line, record_cases, results
from safetensors.torch import load_file, save_file

from zeroinf.convert import convert
from zeroinf.format import Checkpoint

LAYERS = 24  # enough unit files that a kill lands between them


@pytest.fixture(scope="module")
def long_hf(tiny_hf: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with its layers repeated to 24 (random-perturbed): 26 unit files."""
    src = tiny_hf("llama", "single")
    dst = tmp_path_factory.mktemp("long") / "hf"
    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(0)
    for name, t in sd.items():
        if not name.startswith("model.layers.0."):
            if not name.startswith("model.layers."):
                out[name] = t
            continue
        for i in range(LAYERS):
            noise = torch.randn(t.shape, generator=gen) * 0.01
            out[name.replace("layers.0.", f"layers.{i}.")] = (t + noise).contiguous()
    save_file(out, dst / "model.safetensors")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_hidden_layers"] = LAYERS
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def reference(long_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return folder_bytes(convert(long_hf, tmp_path_factory.mktemp("ref") / "zi", progress=False))


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def entries(path: Path) -> int:
    try:
        return len(os.listdir(path))
    except FileNotFoundError:
        return -1


def wait_for_stage(p: object, partial: Path, dst: Path, stage: int) -> None:
    """Until DST.partial holds `stage` entries (or DST exists, or the process ended)."""
    deadline = time.monotonic() + TIMEOUT
    while p.is_alive() and entries(partial) < stage and not dst.exists():  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "convert never got there"
        time.sleep(0.0005)


def check_convert_outcome(tmp: Path, dst: Path, reference: dict[str, bytes]) -> str:
    """DST is complete and equal to an uninterrupted conversion, or absent; returns which."""
    left = sorted(p.name for p in tmp.iterdir() if p.name.startswith("zi"))
    assert set(left) <= {"zi", "zi.partial"}, left
    if not dst.exists():
        return "nothing"
    Checkpoint(dst).verify_all()
    assert folder_bytes(dst) == reference
    return "complete DST"


N_KILL, N_INT = 8, 6


def test_convert_sigkill_at_random_points(
    long_hf: Path, reference: dict[str, bytes], procs: Procs, tmp_path: Path
) -> None:
    outcomes: Counter[str] = Counter()
    n_files = len(reference)
    for trial in range(N_KILL):
        rng = random.Random(100 + trial)
        tmp = tmp_path / f"t{trial}"
        tmp.mkdir()
        dst, partial = tmp / "zi", tmp / "zi.partial"
        p = procs.start("convert", [long_hf, dst, "--quiet"])
        # every 4th trial waits for DST itself: the kill lands after the rename
        wait_for_stage(p, partial, dst, n_files + 1 if trial % 4 == 3 else rng.randint(0, n_files))
        time.sleep(rng.uniform(0, 0.004))
        p.kill()
        p.join(TIMEOUT)
        assert p.exitcode in (-signal.SIGKILL, 0), Path(p.log).read_text()
        if p.exitcode == 0:
            outcomes["finished before the kill"] += 1
        state = check_convert_outcome(tmp, dst, reference)
        if partial.exists():
            state += " + stale DST.partial"
            # a leftover partial is never mistaken for DST, and the next run removes it
        outcomes[state] += 1
        if not dst.exists():
            convert(long_hf, dst, progress=False)
        assert check_convert_outcome(tmp, dst, reference) == "complete DST"
        assert not partial.exists()
    assert sum(n for k, n in outcomes.items() if not k.startswith("finished")) == N_KILL
    record_cases("convert SIGKILL", N_KILL)
    for state, n in sorted(outcomes.items()):
        record_cases(f"convert SIGKILL -> {state}", n)


def test_convert_sigint_at_random_points(
    long_hf: Path, reference: dict[str, bytes], procs: Procs, tmp_path: Path
) -> None:
    outcomes: Counter[str] = Counter()
    n_files = len(reference)
    for trial in range(N_INT):
        rng = random.Random(200 + trial)
        tmp = tmp_path / f"t{trial}"
        tmp.mkdir()
        dst, partial = tmp / "zi", tmp / "zi.partial"
        p = procs.start("convert", [long_hf, dst, "--quiet"])
        # from the moment DST.partial exists: the CLI's handler is in place by then
        wait_for_stage(p, partial, dst, n_files + 1 if trial % 3 == 2 else rng.randint(0, n_files))
        time.sleep(rng.uniform(0, 0.004))
        os.kill(p.pid, signal.SIGINT)
        p.join(TIMEOUT)
        log = Path(p.log).read_text()
        assert p.exitcode in (130, 0), log
        assert not partial.exists()  # an interrupt cleans up
        state = check_convert_outcome(tmp, dst, reference)
        if p.exitcode == 130:
            assert (
                error_line(log, "zeroinf-convert")
                == "interrupted (no partial output was left behind)"
            )
        else:
            assert state == "complete DST"  # the signal came after the work was done
        outcomes[f"exit {p.exitcode}, {state}"] += 1
    record_cases("convert SIGINT", N_INT)
    for state, n in sorted(outcomes.items()):
        record_cases(f"convert SIGINT -> {state}", n)


N_JOB_KILL_TRIALS, N_JOB_INT = 4, 4


@pytest.mark.parametrize("trial", range(N_JOB_KILL_TRIALS))
def test_generate_sigkill_at_random_points_then_resume(
    job: Job, procs: Procs, tmp_path: Path, trial: int
) -> None:
    rng = random.Random(300 + trial)
    out = tmp_path / "out.jsonl"
    kills = runs = 0
    while True:
        have = count_lines(out)
        # a kill while loading (target == have), between batches or inside a write
        target = rng.randint(have, max(have, len(job.reference) - 6)) if kills < 3 else None
        p = procs.start("generate", job.args(out))
        runs += 1
        deadline = time.monotonic() + TIMEOUT
        while target is not None and p.is_alive() and count_lines(out) < target:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        if target is not None and p.is_alive():
            time.sleep(rng.uniform(0, 0.3 if target == have else 0.03))
            p.kill()
        p.join(TIMEOUT)
        if p.exitcode == 0:
            break
        assert p.exitcode == -signal.SIGKILL, Path(p.log).read_text()
        kills += 1
    assert kills >= 1
    assert results(out) == job.reference  # every record once, each as if never interrupted
    record_cases("generate SIGKILL", kills)


@pytest.mark.parametrize("trial", range(N_JOB_INT))
def test_generate_sigint_at_random_points_then_resume(
    job: Job, procs: Procs, tmp_path: Path, trial: int
) -> None:
    rng = random.Random(400 + trial)
    out = tmp_path / "out.jsonl"
    p = procs.start("generate", job.args(out))
    if trial == 0:  # 0-20 ms into the CLI's main: while parsing its flags or loading
        procs.wait_ready(p)
        time.sleep(rng.uniform(0.0, 0.02))
    else:  # in the job's loop: after a random number of lines, between batches or in a write
        target, deadline = rng.randint(1, len(job.reference) - 4), time.monotonic() + TIMEOUT
        while p.is_alive() and count_lines(out) < target:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.02))
    try:
        os.kill(p.pid, signal.SIGINT)
    except ProcessLookupError:
        pass  # it finished first
    p.join(TIMEOUT)
    log = Path(p.log).read_text()
    assert "Traceback" not in log, log
    if p.exitcode == 130:
        said = [x for x in log.splitlines() if x.startswith("zeroinf-generate: ")]
        assert len(said) == 1, log
        assert said[0].endswith("rerun the same command to resume"), log
        partial = results(out) if out.exists() else {}
        assert all(job.reference[k] == v for k, v in partial.items())
        if "interrupted; records already written are kept" in said[0]:
            where = "while loading"
            assert not partial
        else:
            left = len(job.reference) - len(partial)
            assert f"interrupted with {left} to go" in said[0], log
            where = "in the job loop" if left else "while closing"
        code, log = procs.run("generate", job.args(out))
        assert code == 0, log
    else:
        assert p.exitcode == 0, log  # done before the signal came
        where = "after the job"
    assert results(out) == job.reference
    record_cases("generate SIGINT", 1)
    record_cases(f"generate SIGINT -> {where}", 1)
