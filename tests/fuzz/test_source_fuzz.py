"""Fuzzed Hugging Face sources: safetensors headers (entries of any JSON, lengths that lie),
index files naming shards with any string, config.json of any bytes. Every case ends in a
one-line CheckpointError naming the file, or in tensors whose shapes and byte ranges are real;
never another exception, never a hang."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest
from fuzz_helpers import FUZZ, count, mutate, paths, texts, values
from hypothesis import given
from hypothesis import strategies as st

from zeroinf.convert import _read_config
from zeroinf.errors import CheckpointError
from zeroinf.hf_source import ST_DTYPES, safetensors_header, weight_files

BASE = {
    "a.weight": {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]},
    "b.bias": {"dtype": "BF16", "shape": [8], "data_offsets": [128, 144]},
    "__metadata__": {"format": "pt"},
}


@st.composite
def headers(draw: st.DrawFn) -> tuple[dict[str, Any], int, int | None]:
    """(header, data bytes, a lying header length or None)."""
    raw: Any = BASE
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(paths(raw)))
        action = draw(st.sampled_from(["set", "delete", "add"]))
        v = draw(values | st.sampled_from(sorted(ST_DTYPES)) | st.sampled_from([-4, 8, 144]))
        raw = mutate(raw, path, action, v, draw(texts))
    data = draw(st.sampled_from([144, 144, 144, 0, 100, 1 << 16]))
    lie = draw(st.sampled_from([None] * 6 + [0, 1, 2**63, 2**64 - 1]) | st.integers(0, 400))
    return raw, data, lie


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("src")


@FUZZ
@given(headers())
def test_safetensors_header(folder: Path, case: tuple[Any, int, int | None]) -> None:
    count("safetensors headers")
    header, data, lie = case
    text = json.dumps(header).encode()
    path = folder / "model.safetensors"
    n = len(text) if lie is None else lie
    path.write_bytes(struct.pack("<Q", n) + text + bytes(data))
    try:
        found = safetensors_header(path)
    except CheckpointError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
        count("safetensors headers -> CheckpointError")
        return
    size = path.stat().st_size
    for t in found.values():
        assert all(isinstance(s, int) and s >= 0 for s in t.shape)
        assert t.dtype.itemsize * math.prod(t.shape) == t.nbytes
        assert 8 <= t.start and t.start + t.nbytes <= size
    count("safetensors headers -> parsed, ranges inside the file")


@FUZZ
@given(st.dictionaries(texts, texts | values, max_size=4) | values)
def test_index_shard_names(folder: Path, weight_map: Any) -> None:
    count("safetensors index files")
    sub = folder / "idx"
    sub.mkdir(exist_ok=True)
    for p in sub.iterdir():
        p.unlink()
    (sub / "model-1.safetensors").write_bytes(b"")
    index = sub / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    try:
        kind, files = weight_files(sub)
    except CheckpointError as e:
        assert str(e).startswith(str(sub)) and "\n" not in str(e)
        return
    assert kind == "safetensors"
    assert all(f.resolve().parent == sub.resolve() and f.is_file() for f in files)


@FUZZ
@given(st.binary(max_size=100) | values.map(lambda v: json.dumps(v).encode()))
def test_config_json(folder: Path, data: bytes) -> None:
    count("config.json contents")
    sub = folder / "cfg"
    sub.mkdir(exist_ok=True)
    (sub / "config.json").write_bytes(data)
    try:
        config = _read_config(sub)
    except CheckpointError as e:
        assert str(e) == f"{sub / 'config.json'}: not a readable JSON object"
        return
    assert isinstance(config, dict)
