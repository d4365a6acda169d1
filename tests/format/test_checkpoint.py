"""The reader: a checkpoint is validated against its files on open (sizes), checksums on demand,
and tensors are views into the caller's buffer. Oracle: the unit files' bytes."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from zeroinf.convert import convert
from zeroinf.errors import CheckpointError
from zeroinf.format import Checkpoint, tensor_views


@pytest.fixture(scope="module")
def converted(tiny_hf: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert(tiny_hf("llama"), tmp_path_factory.mktemp("ck") / "zi", progress=False)


@pytest.fixture
def ckpt_copy(converted: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(converted, tmp_path / "zi"))


def test_views_alias_the_buffer(converted: Path) -> None:
    ckpt = Checkpoint(converted)
    ckpt.verify_all()
    for u in ckpt.units:
        buf = torch.empty(u.nbytes + 8192, dtype=torch.uint8)  # larger than needed is fine
        ckpt.read_unit(u, buf)
        assert buf[: u.nbytes].numpy().tobytes() == ckpt.unit_path(u).read_bytes()
        lo, hi = buf.data_ptr(), buf.data_ptr() + u.nbytes
        for t in u.tensors:
            v = tensor_views(u, buf)[t.name]
            assert lo + t.offset == v.data_ptr() and v.data_ptr() + t.nbytes <= hi  # no copy
            assert tuple(v.shape) == t.shape


@pytest.mark.parametrize("which", [0, -1])
def test_truncated_unit_caught_on_open(ckpt_copy: Path, which: int) -> None:
    u = Checkpoint(ckpt_copy).units[which]
    path = ckpt_copy / u.file
    with open(path, "r+b") as f:
        f.truncate(u.nbytes - 4096)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(ckpt_copy)
    assert str(path) in str(e.value) and "truncated" in str(e.value)


def test_missing_unit_caught_on_open(ckpt_copy: Path) -> None:
    u = Checkpoint(ckpt_copy).units[1]
    (ckpt_copy / u.file).unlink()
    with pytest.raises(CheckpointError, match=f"{u.file}.*missing"):
        Checkpoint(ckpt_copy)


def test_flipped_byte_in_every_unit_caught_by_verify(ckpt_copy: Path) -> None:
    ckpt = Checkpoint(ckpt_copy)
    for u in ckpt.units:
        path = ckpt.unit_path(u)
        data = bytearray(path.read_bytes())
        for pos in (0, len(data) // 2 + 3, len(data) - 1):  # tensor bytes and padding alike
            data[pos] ^= 0x10
            path.write_bytes(data)
            with pytest.raises(CheckpointError) as e:
                Checkpoint(ckpt_copy).verify_all()
            assert str(path) in str(e.value) and "CRC32" in str(e.value)
            data[pos] ^= 0x10
            path.write_bytes(data)
        Checkpoint(ckpt_copy).verify_all()


def test_bad_manifest_named(ckpt_copy: Path) -> None:
    (ckpt_copy / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json: unreadable manifest"):
        Checkpoint(ckpt_copy)
    (ckpt_copy / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest"):
        Checkpoint(ckpt_copy)


def test_short_read_named(ckpt_copy: Path) -> None:
    ckpt = Checkpoint(ckpt_copy)  # opened while whole, then the file shrinks
    u = ckpt.units[0]
    with open(ckpt.unit_path(u), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="short read 100"):
        ckpt.read_unit(u, torch.empty(u.nbytes, dtype=torch.uint8))
