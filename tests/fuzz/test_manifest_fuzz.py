"""Fuzzed manifests: a valid manifest with random mutations (keys set to any JSON value, deleted
or added; file names, sizes, offsets, dtypes, unicode, huge numbers) fed to format.parse_manifest
and, written to disk, to Checkpoint on a folder of real unit files and symlinks. Every case ends
in a one-line CheckpointError naming the manifest or file, or in a checkpoint whose invariants
hold; never another exception, never a hang (the profile's deadline)."""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import pytest
from fuzz_helpers import FUZZ, count, mutate, paths, texts, values
from hypothesis import given
from hypothesis import strategies as st

from zeroinf.errors import CheckpointError
from zeroinf.format import DTYPES, MANIFEST, Checkpoint, Manifest, parse_manifest

UNIT = 8192


def tensor(name: str, dtype: str, shape: list[int], offset: int) -> dict[str, Any]:
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    return {"name": name, "dtype": dtype, "shape": shape, "offset": offset, "nbytes": nbytes}


def base_manifest(quantized: bool) -> dict[str, Any]:
    crc = zlib.crc32(bytes(UNIT))
    layer = [tensor("n.weight", "float32", [8], 0), tensor("w.weight", "float32", [16, 8], 4096)]
    if quantized:
        layer = [
            tensor("w.qweight", "int8", [32, 64], 0),
            tensor("w.scales", "float16", [1, 32], 4096),
        ]
    units = [("embed", [tensor("e.weight", "float32", [16, 8], 0)])]
    units += [(f"layers.{i}", layer) for i in range(2)]
    units += [("head", [tensor("h.weight", "float16", [4, 4], 0)])]
    quant = None
    if quantized:
        quant = {"bits": 8, "group_size": 64, "scheme": "sym", "scale_dtype": "float16",
                 "tensors": ["w"]}  # fmt: skip
    return {
        "format": "zeroinf", "version": 1, "alignment": 4096, "dtype": "float32",
        "quantization": quant, "config": {"model_type": "llama", "hidden_size": 8},
        "units": [{"name": n, "file": f"{j}-{n}.bin", "nbytes": UNIT, "crc32": crc, "tensors": t}
                  for j, (n, t) in enumerate(units)],
    }  # fmt: skip


BASES = [base_manifest(False), base_manifest(True)]

FILE_NAMES = ["../x.bin", "/etc/passwd", "a\x00b", "x" * 300, "\udc80.bin", "", ".", "sub/",
              "0-embed.bin", "link_in.bin", "link_out.bin", "linkdir/0-embed.bin",
              "missing.bin", "small.bin", "sub/../1-layers.0.bin", "é.bin"]  # fmt: skip
interesting = st.sampled_from(FILE_NAMES) | st.sampled_from(sorted(DTYPES) + ["float64", "bool"])


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    raw = draw(st.sampled_from(BASES))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths(raw)))
        action = draw(st.sampled_from(["set", "set", "delete", "add", "nudge", "nudge"]))
        if action == "nudge":  # a plausible edit: an integer off by a few pages, a renamed key
            node = raw
            for k in path:
                node = node[k]
            if isinstance(node, int) and not isinstance(node, bool):
                value = node + 4096 * draw(st.integers(-2, 2))
            else:
                value = node if not isinstance(node, str) else node + draw(st.sampled_from("x."))
            action = "set"
        else:
            value = draw(values | interesting)
        raw = mutate(raw, path, action, value, draw(texts))
    return raw


def check(m: Manifest) -> None:
    """What a parsed manifest guarantees to everything downstream."""
    assert m.dtype in DTYPES and m.alignment == 4096
    names = [u.name for u in m.units]
    assert names == ["embed", *(f"layers.{i}" for i in range(len(names) - 2)), "head"]
    for u in m.units:
        f = Path(u.file)
        assert not f.is_absolute() and ".." not in f.parts and "\x00" not in u.file
        u.file.encode()  # a usable file name
        assert u.nbytes > 0 and u.nbytes % 4096 == 0 and 0 <= u.crc32 < 2**32
        for t in u.tensors:
            assert t.dtype in DTYPES and all(isinstance(s, int) and s >= 0 for s in t.shape)
            assert t.nbytes == math.prod(t.shape) * DTYPES[t.dtype].itemsize
            assert t.offset % 4096 == 0 and 0 <= t.offset and t.offset + t.nbytes <= u.nbytes


@FUZZ
@given(mutated())
def test_parse_manifest(raw: dict[str, Any]) -> None:
    count("parse_manifest: mutated manifests")
    try:
        m = parse_manifest(raw, MANIFEST)
    except CheckpointError as e:
        msg = str(e)
        assert msg.startswith(f"{MANIFEST}") and "\n" not in msg
        count("parse_manifest: mutated manifests -> CheckpointError")
        return
    check(m)
    count("parse_manifest: mutated manifests -> valid, invariants hold")


@FUZZ
@given(values)
def test_parse_manifest_any_json(raw: Any) -> None:
    count("parse_manifest: arbitrary JSON")
    with pytest.raises(CheckpointError, match=f"^{MANIFEST}"):
        parse_manifest(raw, MANIFEST)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Unit files for the base manifests, plus symlinks in and out and a short file."""
    root = tmp_path_factory.mktemp("fuzz")
    ck, outside = root / "ck", root / "outside"
    ck.mkdir()
    outside.mkdir()
    for u in BASES[0]["units"]:
        (ck / u["file"]).write_bytes(bytes(UNIT))
    (outside / "0-embed.bin").write_bytes(bytes(UNIT))
    (ck / "small.bin").write_bytes(bytes(100))
    os.symlink("1-layers.0.bin", ck / "link_in.bin")
    os.symlink(outside / "0-embed.bin", ck / "link_out.bin")
    os.symlink(outside, ck / "linkdir")
    return ck


@FUZZ
@given(mutated())
def test_checkpoint_on_disk(folder: Path, raw: dict[str, Any]) -> None:
    count("Checkpoint: mutated manifests on disk")
    mpath = folder / MANIFEST
    mpath.write_text(json.dumps(raw))
    try:
        ckpt = Checkpoint(folder)
    except CheckpointError as e:
        msg = str(e)
        assert msg.startswith(str(folder)) and "\n" not in msg
        count("Checkpoint: mutated manifests on disk -> CheckpointError")
        return
    check(ckpt.manifest)
    count("Checkpoint: mutated manifests on disk -> opened, invariants hold")
    root = folder.resolve()
    for u in ckpt.units:
        f = ckpt.unit_path(u)
        assert f.resolve().is_relative_to(root) and f.stat().st_size == u.nbytes


@FUZZ
@given(st.binary(max_size=200) | texts.map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_checkpoint_manifest_bytes(folder: Path, data: bytes) -> None:
    count("Checkpoint: arbitrary manifest bytes")
    mpath = folder / MANIFEST
    mpath.write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(folder)
    assert str(e.value).startswith(f"{mpath}: ") and "\n" not in str(e.value)
