"""A disk that fills up: during zeroinf-convert (no DST, no DST.partial left; exit 2 with one
line naming DST) and during a batch job's output writes (only whole, distinct records on disk;
exit 2 naming the output; a rerun once space is freed completes with every id exactly once).

Two stand-ins for a small disk: a tmpfs of a few pages (real ENOSPC; needs root to mount) and
RLIMIT_FSIZE in the CLI's process (EFBIG past a file size; works anywhere)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fault_helpers import (
    Job,
    Procs,
    error_line,
    mount_tmpfs,
    record_cases,
    resize_tmpfs,
    results,
    umount,
)

PAGE = 4096


def pages(folder: Path) -> int:
    return sum(-(-p.stat().st_size // PAGE) for p in folder.iterdir())


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """small_disk(nbytes) -> a folder on a tmpfs of that size (skips where mounting fails)."""
    mounted: list[Path] = []

    def make(nbytes: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        if not mount_tmpfs(folder, nbytes):
            pytest.skip("cannot mount a tmpfs here (not root?); the RLIMIT_FSIZE cases stand in")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        umount(folder)


def convert_fill_points(ckpt: Path) -> dict[str, int]:
    """Disk sizes (pages) at which the conversion of the tiny Llama runs out of space."""
    units = sorted(p for p in ckpt.iterdir() if p.suffix == ".bin")
    unit_pages = [-(-p.stat().st_size // PAGE) for p in units]
    return {
        "first unit": 4,
        "second unit": unit_pages[0] + unit_pages[1] // 2,
        "mid layers": sum(unit_pages[:3]) + 10,
        "tokenizer files": sum(unit_pages) + 1,
        "manifest (last write)": pages(ckpt) - 1,
    }


def test_convert_on_a_full_tmpfs(
    tiny_hf: Callable[..., Path], ckpt: Path, procs: Procs, small_disk: Callable[[int], Path]
) -> None:
    src, reference = tiny_hf("llama"), {p.name: p.read_bytes() for p in ckpt.iterdir()}
    points = convert_fill_points(ckpt)
    for where, n in points.items():
        disk = small_disk(n * PAGE)
        dst = disk / "zi"
        code, log = procs.run("convert", [src, dst, "--quiet"])
        assert code == 2, (where, log)
        assert error_line(log, "zeroinf-convert") == (
            f"{dst}: disk full (No space left on device) while converting; removed zi.partial"
        ), where
        assert os.listdir(disk) == [], where  # no DST, no DST.partial, nothing else
        resize_tmpfs(disk, (pages(ckpt) + 8) * PAGE)  # space freed: the same command works
        code, log = procs.run("convert", [src, dst, "--quiet", "--check"])
        assert code == 0, log
        assert {p.name: p.read_bytes() for p in dst.iterdir()} == reference
        assert os.listdir(disk) == ["zi"]
    record_cases("convert, tmpfs full (ENOSPC)", len(points))


@pytest.mark.parametrize("limit", [100_000, 200_000])
def test_convert_past_a_file_size_limit(
    tiny_hf: Callable[..., Path], ckpt: Path, procs: Procs, tmp_path: Path, limit: int
) -> None:
    """RLIMIT_FSIZE below the embedding (147456 bytes) or below a layer (339968 bytes)."""
    dst = tmp_path / "zi"
    code, log = procs.run("convert", [tiny_hf("llama"), dst, "--quiet"], fsize=limit)
    assert code == 2, log
    assert error_line(log, "zeroinf-convert") == (
        f"{dst}: File too large while converting; removed zi.partial"
    )
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("zi")) == []
    code, log = procs.run("convert", [tiny_hf("llama"), dst, "--quiet", "--check"])
    assert code == 0, log
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == {
        p.name: p.read_bytes() for p in ckpt.iterdir()
    }
    record_cases("convert, RLIMIT_FSIZE (EFBIG)", 1)


def job_error(out: Path, why: str) -> re.Pattern[str]:
    return re.compile(
        rf"--output {re.escape(str(out))}: {why} while writing \d+ record\(s\); every record "
        r"before them is kept: free space and rerun to resume"
    )


def check_partial_then_resume(job: Job, procs: Procs, out: Path, log: str, why: str) -> int:
    """The failed run's output holds whole, distinct, correct records; a rerun completes it."""
    assert job_error(out, why).fullmatch(error_line(log, "zeroinf-generate")), log
    partial = results(out) if out.exists() else {}  # no torn tail, no repeated key
    assert all(job.reference[k] == v for k, v in partial.items())
    assert len(partial) < len(job.reference)
    return len(partial)


@pytest.mark.parametrize("free_pages", [0, 1])
def test_job_output_on_a_full_tmpfs(
    job: Job, procs: Procs, small_disk: Callable[[int], Path], free_pages: int
) -> None:
    disk = small_disk(16 * PAGE)
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (16 - free_pages) * PAGE)
    out = disk / "out.jsonl"
    code, log = procs.run("generate", job.args(out))
    assert code == 2, log
    kept = check_partial_then_resume(job, procs, out, log, "No space left on device")
    assert kept == 0 if free_pages == 0 else kept > 0
    filler.unlink()  # space freed: the same command finishes the job
    code, log = procs.run("generate", job.args(out))
    assert code == 0, log
    assert f"{kept} already done of {len(job.reference)} records" in log
    assert results(out) == job.reference
    record_cases("job output, tmpfs full (ENOSPC)", 1)


@pytest.mark.parametrize("limit", [1000, 4000])
def test_job_output_past_a_file_size_limit(
    job: Job, procs: Procs, tmp_path: Path, limit: int
) -> None:
    out = tmp_path / "out.jsonl"
    code, log = procs.run("generate", job.args(out), fsize=limit)
    assert code == 2, log
    kept = check_partial_then_resume(job, procs, out, log, "File too large")
    assert 0 < out.stat().st_size <= limit and kept > 0
    code, log = procs.run("generate", job.args(out))
    assert code == 0, log
    assert results(out) == job.reference
    record_cases("job output, RLIMIT_FSIZE (EFBIG)", 1)
