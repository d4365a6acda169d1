"""zeroinf-convert: success paths, --check, and every bad input exiting 2 with ONE line."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import zeroinf.convert as zc
from zeroinf.cli.convert import main
from zeroinf.format import Checkpoint

PREFIX = "zeroinf-convert: error: "


def run_main(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def converted(tiny_hf: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> Path:
    code, out, _ = run_main(capsys, tiny_hf("opt"), tmp_path / "zi", "--quiet")
    assert code == 0 and "5 units" in out
    return tmp_path / "zi"


def test_convert_and_check(
    tiny_hf: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, out, _ = run_main(
        capsys, tiny_hf("llama"), tmp_path / "zi", "--dtype", "bfloat16", "--check"
    )
    assert code == 0 and "bfloat16" in out and "OK" in out
    assert Checkpoint(tmp_path / "zi").manifest.dtype == "bfloat16"
    code, out, err = run_main(capsys, "--check", tmp_path / "zi")
    assert code == 0 and out.strip().endswith("sizes and CRC32)") and err == ""


def test_progress_bar_on_stderr(
    tiny_hf: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, _, err = run_main(capsys, tiny_hf("llama"), tmp_path / "zi")
    assert code == 0 and "unit 5/5 head" in err and "B/s" in err


def test_check_names_first_bad_file(converted: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = Checkpoint(converted)
    for u in ckpt.units:
        path = ckpt.unit_path(u)
        data = bytearray(path.read_bytes())
        data[len(data) // 3] ^= 1
        path.write_bytes(data)
        code, _, err = run_main(capsys, "--check", converted)
        assert code == 2 and str(path) in one_error_line(err) and "CRC32" in err
        data[len(data) // 3] ^= 1
        path.write_bytes(data)
    last = ckpt.unit_path(ckpt.units[-1])
    with open(last, "r+b") as f:
        f.truncate(4096)
    code, _, err = run_main(capsys, "--check", converted)
    assert code == 2 and str(last) in one_error_line(err) and "truncated" in err


def _truncated(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    return shard


def _garbage(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shard = sorted(dst.glob("*.safetensors"))[0]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{{{{not json}}}}" + bytes(64))
    return shard


@pytest.mark.parametrize("corrupt", [_truncated, _garbage], ids=["truncated", "garbage"])
def test_corrupt_safetensors_named(
    tiny_hf: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    corrupt: Callable[[Path, Path], Path],
) -> None:
    shard = corrupt(tiny_hf("llama"), tmp_path / "hf")
    code, _, err = run_main(capsys, tmp_path / "hf", tmp_path / "zi")
    assert code == 2 and str(shard) in one_error_line(err)
    assert not (tmp_path / "zi").exists() and not (tmp_path / "zi.partial").exists()


def test_bad_input_exits_2_with_one_line(
    tiny_hf: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture, converted: Path
) -> None:
    src = tiny_hf("llama")
    empty = tmp_path / "empty"
    empty.mkdir()
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text('{"model_type": "bert"}')
    cases = [
        ((tmp_path / "nope", tmp_path / "d1"), "does not exist"),
        ((empty, tmp_path / "d2"), "no config.json"),
        ((bert, tmp_path / "d3"), "'bert' is not supported (supported: "),
        ((src, converted), "already exists (pass --force"),
        ((src, tmp_path / "d4", "--dtype", "int8"), "--dtype"),
        ((src,), "expected SRC DST"),
        ((src, tmp_path / "d5", tmp_path / "d6"), "expected SRC DST"),
        (("--check", tmp_path / "nope"), "no manifest"),
        (("--check", src), "no manifest"),
        (("--bogus",), "unrecognized arguments"),
    ]
    for argv, words in cases:
        code, out, err = run_main(capsys, *argv)
        assert code == 2, (argv, out, err)
        assert words in one_error_line(err), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("d")) == []


def test_disk_full(
    tiny_hf: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = os.write

    def write(fd: int, data: object) -> int:
        if len(memoryview(data)) > 4096:  # unit files, not the manifest's small writes
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(zc.os, "write", write)
    code, _, err = run_main(capsys, tiny_hf("llama"), tmp_path / "zi", "--quiet")
    assert code == 2 and "disk full" in one_error_line(err)
    assert not (tmp_path / "zi").exists() and not (tmp_path / "zi.partial").exists()


def test_ctrl_c_exits_130_and_leaves_nothing(
    tiny_hf: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(path: Path, data: torch.Tensor) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(zc, "_write_unit", interrupted)
    code, _, err = run_main(capsys, tiny_hf("llama"), tmp_path / "zi", "--quiet")
    assert code == 130 and "interrupted" in one_error_line(err)
    assert not (tmp_path / "zi").exists() and not (tmp_path / "zi.partial").exists()


def test_help(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_main(capsys, "--help")
    assert code == 0
    for flag in ("--dtype", "--force", "--check", "SRC DST"):
        assert flag in out


def test_console_script(tiny_hf: Callable[..., Path], tmp_path: Path) -> None:
    """A real process: the installed console script (or `python -m` when not installed)."""
    exe = shutil.which("zeroinf-convert")
    cmd = [exe] if exe else [sys.executable, "-m", "zeroinf.cli.convert"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    ok = subprocess.run(
        [*cmd, str(tiny_hf("llama")), str(tmp_path / "zi"), "--quiet", "--check"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0 and "OK" in ok.stdout, ok.stderr
    bad = subprocess.run(
        [*cmd, str(tiny_hf("llama")), str(tmp_path / "zi")], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and one_error_line(bad.stderr).endswith(
        "(pass --force to replace it)"
    )
