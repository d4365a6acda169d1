"""The zeroinf checkpoint format, v1 (docs/format.md is the public contract).

A checkpoint is a folder: manifest.json plus one file per unit. A unit file is one contiguous
buffer holding the unit's tensors at 4096-aligned offsets, so it moves with one read and one
copy, and its tensors are views into that buffer.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from zeroinf.errors import CheckpointError
from zeroinf.sizes import ALIGN, align_up

FORMAT_NAME = "zeroinf"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# Closed list: a manifest naming any other dtype is rejected before anything is read.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
}


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise CheckpointError(f"dtype {dtype} is not storable in a zeroinf checkpoint")


@dataclass(frozen=True)
class TensorEntry:
    name: str  # the Hugging Face tensor name
    dtype: str
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the unit file, a multiple of 4096
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }


@dataclass(frozen=True)
class UnitEntry:
    name: str  # "embed" | "layers.<i>" | "head"
    file: str  # relative to the checkpoint folder
    nbytes: int  # the file's size, a multiple of 4096
    crc32: int
    tensors: tuple[TensorEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "nbytes": self.nbytes,
            "crc32": self.crc32,
            "tensors": [t.to_json() for t in self.tensors],
        }


@dataclass(frozen=True)
class Manifest:
    dtype: str
    config: dict[str, Any]
    units: tuple[UnitEntry, ...]
    quantization: dict[str, Any] | None = None
    alignment: int = ALIGN

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "alignment": self.alignment,
            "dtype": self.dtype,
            "quantization": self.quantization,
            "config": self.config,
            "units": [u.to_json() for u in self.units],
        }

    def unit(self, name: str) -> UnitEntry:
        for u in self.units:
            if u.name == name:
                return u
        raise CheckpointError(f"manifest has no unit {name!r}")


def layout(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[list[int], int]:
    """Offsets for tensors packed in order, each 4096-aligned; returns (offsets, file size)."""
    offsets, pos = [], 0
    for _, dtype, shape in tensors:
        offsets.append(pos)
        pos = align_up(pos + math.prod(shape) * dtype.itemsize)
    return offsets, max(pos, ALIGN)


def _expect(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CheckpointError(f"{where}: {what}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_dtype(x: Any) -> bool:
    return isinstance(x, str) and x in DTYPES  # (a list or dict would not even hash)


# Real manifests are KBs to a few MB; this bounds what opening a hostile one allocates.
MAX_MANIFEST_BYTES = 64 << 20


def _file_problem(f: str) -> str | None:
    """Why the unit file name `f` cannot name a file inside the checkpoint folder, or None."""
    if os.path.isabs(f) or ".." in Path(f).parts:
        return "leaves the folder"
    if "\x00" in f:
        return "holds a NUL byte"
    try:
        parts = [p.encode() for p in Path(f).parts]
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if not parts or len(f.encode()) > 4095 or any(len(p) > 255 for p in parts):
        return "is not a usable file name (empty, or a part over 255 bytes)"
    return None


_UNIT_NAME = re.compile(r"embed|layers\.(0|[1-9][0-9]*)|head")


def _check_order(names: list[str], where: str) -> None:
    """Units are in execution order: embed, layers.0 .. layers.<n-1>, head."""
    for n in names:
        ok = bool(_UNIT_NAME.fullmatch(n))
        _expect(ok, where, f"unit name {n!r} is not embed|layers.<i>|head")
    expected = ["embed", *(f"layers.{i}" for i in range(len(names) - 2)), "head"]
    _expect(
        names == expected,
        where,
        f"units are not in execution order (embed, layers.0.., head): {names[:4]}...",
    )


def _parse_unit(raw: Any, where: str) -> UnitEntry:
    _expect(isinstance(raw, dict), where, "unit is not an object")
    for key, ok, typ in (
        ("name", lambda x: isinstance(x, str), "a string"),
        ("file", lambda x: isinstance(x, str) and x != "", "a non-empty string"),
        ("nbytes", _is_int, "an integer"),
        ("crc32", lambda x: _is_int(x) and 0 <= x < 2**32, "an unsigned 32-bit integer"),
        ("tensors", lambda x: isinstance(x, list), "a list"),
    ):
        _expect(ok(raw.get(key)), where, f"unit field {key!r} missing or not {typ}")
    where = f"{where} unit {raw['name']!r}"
    f = raw["file"]
    problem = _file_problem(f)
    _expect(problem is None, where, f"file {f!r} {problem}")
    _expect(
        raw["nbytes"] > 0 and raw["nbytes"] % ALIGN == 0,
        where,
        f"nbytes {raw['nbytes']} is not a positive multiple of {ALIGN}",
    )
    tensors = []
    for t in raw["tensors"]:
        _expect(
            isinstance(t, dict) and isinstance(t.get("name"), str),
            where,
            "tensor entry without a string field 'name'",
        )
        tw = f"{where} tensor {t['name']!r}"
        _expect(_is_dtype(t.get("dtype")), tw, f"dtype {t.get('dtype')!r} not in {sorted(DTYPES)}")
        shape = t.get("shape")
        _expect(
            isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape),
            tw,
            f"shape {shape!r} is not a list of non-negative integers",
        )
        off, nb = t.get("offset"), t.get("nbytes")
        _expect(_is_int(off), tw, f"offset {off!r} is not an integer")
        _expect(_is_int(nb), tw, f"nbytes {nb!r} is not an integer")
        _expect(
            nb == math.prod(shape) * DTYPES[t["dtype"]].itemsize,
            tw,
            f"nbytes {nb} does not match shape {shape} of {t['dtype']}",
        )
        _expect(
            off >= 0 and off % ALIGN == 0 and off + nb <= raw["nbytes"],
            tw,
            f"offset {off} not {ALIGN}-aligned or past the unit's {raw['nbytes']} bytes",
        )
        tensors.append(TensorEntry(t["name"], t["dtype"], tuple(shape), off, nb))
    names = [t.name for t in tensors]
    _expect(len(set(names)) == len(names), where, "duplicate tensor names")
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (_, end, a), (start, _, b) in pairwise(spans):
        _expect(start >= end, where, f"tensors {a!r} and {b!r} overlap")
    return UnitEntry(raw["name"], f, raw["nbytes"], raw["crc32"], tuple(tensors))


def parse_manifest(raw: Any, where: str = MANIFEST) -> Manifest:
    """Validate a manifest's structure (no file access). Raises CheckpointError naming the field."""
    _expect(isinstance(raw, dict), where, "not a JSON object")
    _expect(
        raw.get("format") == FORMAT_NAME, where, f"format is {raw.get('format')!r}, not 'zeroinf'"
    )
    _expect(
        _is_int(raw.get("version")) and raw["version"] == FORMAT_VERSION,
        where,
        f"version {raw.get('version')!r} is not supported (this zeroinf reads {FORMAT_VERSION})",
    )
    align = raw.get("alignment")
    _expect(_is_int(align) and align == ALIGN, where, f"alignment {align!r} != {ALIGN}")
    _expect(
        _is_dtype(raw.get("dtype")), where, f"dtype {raw.get('dtype')!r} not in {sorted(DTYPES)}"
    )
    _expect(isinstance(raw.get("config"), dict), where, "config missing")
    _expect(
        raw.get("quantization") is None or isinstance(raw["quantization"], dict),
        where,
        "quantization must be null or an object",
    )
    _expect(isinstance(raw.get("units"), list) and raw["units"], where, "units missing or empty")
    units = tuple(_parse_unit(u, where) for u in raw["units"])
    names = [u.name for u in units]
    _expect(len(set(names)) == len(names), where, "duplicate unit names")
    _check_order(names, where)
    files = [os.path.normpath(u.file) for u in units]
    _expect(len(set(files)) == len(files), where, "two units share one file")
    if raw.get("quantization") is not None:
        _check_quantization(raw["quantization"], units, where)
    return Manifest(raw["dtype"], raw["config"], units, raw.get("quantization"))


def _check_quantization(q: dict[str, Any], units: tuple[UnitEntry, ...], where: str) -> None:
    """{"bits": 4|8, "group_size": G, "scheme": "sym"|"asym", "scale_dtype": "float16",
    "tensors": [HF names]}: each named weight is stored as <name>.qweight and <name>.scales
    (+ <name>.zeros for asym) in one unit, with the shapes kernels.quant's layout implies."""
    w = f"{where} quantization"
    _expect(q.get("bits") in (4, 8), w, f"bits {q.get('bits')!r} not 4 or 8")
    g = q.get("group_size")
    _expect(_is_int(g) and g >= 2 and g & (g - 1) == 0, w, f"group_size {g!r}: a power of two")
    _expect(q.get("scheme") in ("sym", "asym"), w, f"scheme {q.get('scheme')!r}")
    _expect(_is_dtype(q.get("scale_dtype")), w, f"scale_dtype {q.get('scale_dtype')!r}")
    names = q.get("tensors")
    _expect(isinstance(names, list) and all(isinstance(n, str) for n in names), w, "tensors")
    parts = ["qweight", "scales"] + (["zeros"] if q["scheme"] == "asym" else [])
    stored = {t.name: t for u in units for t in u.tensors}
    qdtype = "int8" if q["bits"] == 8 else "uint8"
    for n in names:
        for part in parts:
            _expect(f"{n}.{part}" in stored, w, f"tensor {n!r} has no {part}")
        qw, sc = stored[f"{n}.qweight"], stored[f"{n}.scales"]
        k = qw.shape[1] * (2 if q["bits"] == 4 else 1) if len(qw.shape) == 2 else -1
        _expect(
            qw.dtype == qdtype and len(sc.shape) == 2 and k > 0 and k % g == 0
            and sc.shape == (k // g, qw.shape[0]) and sc.dtype == q["scale_dtype"],
            w, f"tensor {n!r}: qweight {qw.dtype}{list(qw.shape)} / scales "
            f"{sc.dtype}{list(sc.shape)} do not fit int{q['bits']} groups of {g}",
        )  # fmt: skip


def write_manifest(folder: Path, manifest: Manifest) -> None:
    path = Path(folder) / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest.to_json(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def crc32_file(path: Path, chunk: int = 16 << 20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


class Checkpoint:
    """An opened zeroinf checkpoint: manifest validated against the unit files' sizes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise CheckpointError(f"{mpath}: no manifest (not a zeroinf checkpoint)")
        try:
            size = mpath.stat().st_size
            _expect(
                size <= MAX_MANIFEST_BYTES,
                str(mpath),
                f"{size} bytes is over the {MAX_MANIFEST_BYTES} byte limit of a manifest",
            )
            raw = json.loads(mpath.read_bytes())
        except (OSError, ValueError, RecursionError) as e:
            why = "nested too deeply" if isinstance(e, RecursionError) else e
            raise CheckpointError(f"{mpath}: unreadable manifest ({why})") from None
        self.manifest = parse_manifest(raw, str(mpath))
        root = self.path.resolve()
        for u in self.manifest.units:
            f = self.unit_path(u)
            try:  # resolve() follows symlinks: a link out of the folder is refused here
                inside = f.resolve().is_relative_to(root)
                is_file = inside and f.is_file()
                size = f.stat().st_size if is_file else -1
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{f}: unit {u.name!r} file unusable ({e})") from None
            _expect(inside, str(f), "resolves outside the checkpoint")
            _expect(is_file, str(f), f"unit {u.name!r} file missing")
            _expect(
                size == u.nbytes, str(f), f"size {size} != manifest nbytes {u.nbytes} (truncated?)"
            )

    @property
    def units(self) -> tuple[UnitEntry, ...]:
        return self.manifest.units

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.config

    def unit_path(self, unit: UnitEntry) -> Path:
        return self.path / unit.file

    def read_unit(self, unit: UnitEntry, out: torch.Tensor) -> torch.Tensor:
        """Plain buffered read of a whole unit into `out` (uint8, >= unit.nbytes). For tests and
        tools; the executor reads through zeroinf.io's backends."""
        assert out.dtype == torch.uint8 and out.numel() >= unit.nbytes and out.is_contiguous()
        path = self.unit_path(unit)
        view = memoryview(out.numpy()[: unit.nbytes])
        n = 0
        # Loop: Linux returns at most ~2 GiB per read, and a file may shrink under us.
        with open(path, "rb", buffering=0) as f:
            while n < unit.nbytes and (got := f.readinto(view[n:])):
                n += got
        if n != unit.nbytes:
            raise CheckpointError(f"{path}: short read {n} of {unit.nbytes} bytes (truncated?)")
        return out

    def verify(self, unit: UnitEntry) -> None:
        path = self.unit_path(unit)
        crc = crc32_file(path)
        if crc != unit.crc32:
            raise CheckpointError(
                f"{path}: CRC32 {crc:#010x} != manifest {unit.crc32:#010x} "
                f"(unit {unit.name!r} is corrupt)"
            )

    def verify_all(self) -> None:
        for u in self.units:
            self.verify(u)


def tensor_views(unit: UnitEntry, buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of the unit's tensors into `buf` (uint8, holding the unit's bytes); no copies."""
    assert buf.dtype == torch.uint8 and buf.numel() >= unit.nbytes
    out = {}
    for t in unit.tensors:
        out[t.name] = buf[t.offset : t.offset + t.nbytes].view(DTYPES[t.dtype]).view(t.shape)
    return out


def padded_size(nbytes: int, world: int, alignment: int = ALIGN) -> int:
    """A unit's size padded so that `world` ranks each own an equal, aligned byte range."""
    return align_up(nbytes, world * alignment)


def partition(nbytes: int, rank: int, world: int, alignment: int = ALIGN) -> tuple[int, int]:
    """Byte range [start, stop) of the padded unit that rank `rank` of `world` owns (ZeRO's flat
    partitioning). Ranges are equal, aligned, disjoint and cover the padded unit exactly."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    share = padded_size(nbytes, world, alignment) // world
    return rank * share, (rank + 1) * share
