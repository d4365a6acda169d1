"""Manifest validation: a valid manifest round-trips; every bad field is rejected by a one-line
CheckpointError that names the field (and the unit and tensor where there is one)."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from zeroinf.errors import CheckpointError
from zeroinf.format import parse_manifest


def tensor(name: str, offset: int, shape: list[int], dtype: str = "float16") -> dict[str, Any]:
    size = {"float16": 2, "float32": 4}[dtype]
    n = size
    for s in shape:
        n *= s
    return {"name": name, "dtype": dtype, "shape": shape, "offset": offset, "nbytes": n}


def valid() -> dict[str, Any]:
    return {
        "format": "zeroinf",
        "version": 1,
        "alignment": 4096,
        "dtype": "float16",
        "quantization": None,
        "config": {"model_type": "llama"},
        "units": [
            {
                "name": "embed",
                "file": "0-embed.bin",
                "nbytes": 8192,
                "crc32": 1,
                "tensors": [tensor("model.embed_tokens.weight", 0, [64, 32])],
            },
            {
                "name": "layers.0",
                "file": "1-layers.0.bin",
                "nbytes": 8192,
                "crc32": 2**32 - 1,
                "tensors": [tensor("a.weight", 0, [16, 16]), tensor("b.weight", 4096, [8])],
            },
            {
                "name": "head",
                "file": "2-head.bin",
                "nbytes": 4096,
                "crc32": 0,
                "tensors": [tensor("model.norm.weight", 0, [32])],
            },
        ],
    }


def test_valid_round_trip() -> None:
    m = parse_manifest(valid())
    assert [u.name for u in m.units] == ["embed", "layers.0", "head"]
    assert m.to_json() == valid()
    assert parse_manifest(m.to_json()) == m


def test_extra_keys_are_accepted() -> None:
    """Versioning rule: later issues may add keys; a v1 reader ignores the ones it does not know."""
    raw = valid()
    raw["new_top_level_key"] = {"x": 1}
    raw["units"][0]["new_unit_key"] = 3
    raw["units"][0]["tensors"][0]["new_tensor_key"] = "y"
    assert parse_manifest(raw).units[0].name == "embed"


def _set(raw: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    *parents, last = path
    for p in parents:
        raw = raw[p]
    if value is _DELETE:
        del raw[last]
    else:
        raw[last] = value


_DELETE = object()

# (path into the manifest, bad value, words the message must contain)
CASES = [
    (("format",), "safetensors", ["format"]),
    (("version",), 2, ["version 2"]),
    (("version",), _DELETE, ["version"]),
    (("alignment",), 512, ["alignment 512"]),
    (("alignment",), True, ["alignment"]),
    (("dtype",), "float64", ["dtype 'float64'"]),
    (("config",), _DELETE, ["config"]),
    (("quantization",), 4, ["quantization"]),
    (("units",), [], ["units"]),
    (("units", 0, "nbytes"), 4097, ["'embed'", "nbytes 4097"]),
    (("units", 0, "nbytes"), _DELETE, ["'nbytes'"]),
    (("units", 1, "crc32"), -1, ["'crc32'"]),
    (("units", 1, "crc32"), 2**32, ["'crc32'"]),
    (("units", 1, "crc32"), True, ["'crc32'"]),
    (("units", 1, "file"), "../1.bin", ["'layers.0'", "leaves the folder"]),
    (("units", 1, "file"), "/etc/passwd", ["'layers.0'", "leaves the folder"]),
    (("units", 1, "file"), "0-embed.bin", ["share one file"]),
    (("units", 1, "tensors"), "a", ["'tensors'"]),
    (("units", 1, "tensors", 0, "name"), 3, ["'name'"]),
    (("units", 1, "tensors", 0, "dtype"), "float64", ["'a.weight'", "dtype 'float64'"]),
    (("units", 1, "tensors", 0, "shape"), [16, -1], ["'a.weight'", "shape"]),
    (("units", 1, "tensors", 0, "shape"), [16, 8], ["'a.weight'", "nbytes 512"]),
    (("units", 1, "tensors", 0, "offset"), 100, ["'a.weight'", "offset 100"]),
    (("units", 1, "tensors", 0, "offset"), 8192, ["'a.weight'", "offset 8192"]),
    (("units", 1, "tensors", 0, "offset"), "0", ["'a.weight'", "offset '0'"]),
    (("units", 1, "tensors", 0, "nbytes"), 1.5, ["'a.weight'", "nbytes 1.5"]),
    (("units", 1, "tensors", 1, "offset"), 0, ["'a.weight'", "'b.weight'", "overlap"]),
    (("units", 1, "tensors", 1, "name"), "a.weight", ["'layers.0'", "duplicate tensor"]),
    (("units", 1, "name"), "decoder.0", ["unit name 'decoder.0'"]),
    (("units", 1, "name"), "layers.1", ["execution order"]),
    (("units", 1, "name"), "head", ["duplicate unit names"]),
]


@pytest.mark.parametrize("path,value,words", CASES, ids=[str(c[:2]) for c in CASES])
def test_bad_field_is_named(path: tuple[Any, ...], value: Any, words: list[str]) -> None:
    raw = copy.deepcopy(valid())
    _set(raw, path, value)
    with pytest.raises(CheckpointError) as e:
        parse_manifest(raw, "ck/manifest.json")
    msg = str(e.value)
    assert msg.startswith("ck/manifest.json"), msg
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_units_out_of_order() -> None:
    raw = valid()
    raw["units"] = [raw["units"][1], raw["units"][0], raw["units"][2]]
    with pytest.raises(CheckpointError, match="execution order"):
        parse_manifest(raw)


def test_not_an_object() -> None:
    with pytest.raises(CheckpointError, match="not a JSON object"):
        parse_manifest([1, 2])
