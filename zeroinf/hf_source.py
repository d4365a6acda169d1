"""The tensors of a Hugging Face folder, by name, read one at a time.

Only headers are parsed up front. safetensors files are read with pread straight into the
caller's buffer (no mmap, so reading a shard does not grow the process's RSS by the shard);
pytorch_model*.bin files are loaded with torch.load(weights_only=True, mmap=True), one shard
open at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zeroinf.errors import CheckpointError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


@dataclass(frozen=True)
class SrcTensor:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in a safetensors file; -1 for .bin

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def safetensors_header(path: Path) -> dict[str, SrcTensor]:
    """Parse and check a safetensors header against the file's size (truncation shows here)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, _MAX_HEADER):
            raise CheckpointError(
                f"{path}: truncated or corrupt safetensors file "
                f"(header length {n}, file has {size} bytes)"
            )
        raw = f.read(n)
    try:
        meta = json.loads(raw)
        assert isinstance(meta, dict)
    except (ValueError, AssertionError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)") from None
    out: dict[str, SrcTensor] = {}
    for name, e in meta.items():
        if name == "__metadata__":
            continue
        # Strict types: int("12") or int(1.5) would make up a shape the file does not have.
        ok = (
            isinstance(e, dict)
            and isinstance(e.get("dtype"), str)
            and e["dtype"] in ST_DTYPES
            and _ints(e.get("shape"))
            and _ints(e.get("data_offsets"))
            and len(e["data_offsets"]) == 2
        )
        if not ok:
            raise CheckpointError(f"{path}: corrupt safetensors entry for tensor {name!r}")
        dtype, shape = ST_DTYPES[e["dtype"]], tuple(e["shape"])
        begin, end = e["data_offsets"]
        t = SrcTensor(path, dtype, shape, 8 + n + begin)
        if end - begin != t.nbytes or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r}: data size does not match its shape")
        if 8 + n + end > size:
            raise CheckpointError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                f"{8 + n + end}, the file has {size}"
            )
        out[name] = t
    return out


def _ints(x: Any) -> bool:
    """A JSON list of non-negative integers."""
    return isinstance(x, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in x
    )


def _inside(folder: Path, name: Any, where: Path) -> Path:
    """folder/name for a shard named in an index, refusing names that leave the folder. (A
    shard may be a symlink out of it: the Hugging Face cache links snapshots to its blobs.)"""
    if not isinstance(name, str) or not name or "\x00" in name or not name.isprintable():
        raise CheckpointError(f"{where}: shard name {name!r} is not a file name")
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise CheckpointError(f"{where}: shard {name!r} leaves the folder")
    return folder / name


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Legacy (non-zip) torch.save format cannot be mapped: the whole shard is loaded.
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable PyTorch weights ({_one_line(e)})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: not a state dict ({type(sd).__name__})")
    return sd


def weight_files(folder: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", shard files), following an index file when there is one."""
    for kind, index, pattern, single in (
        ("safetensors", "model.safetensors.index.json", "*.safetensors", "model.safetensors"),
        ("bin", "pytorch_model.bin.index.json", "pytorch_model*.bin", "pytorch_model.bin"),
    ):
        ipath = folder / index
        if ipath.is_file():
            try:
                names = set(json.loads(ipath.read_bytes())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
                raise CheckpointError(f"{ipath}: unreadable index (no weight_map)") from None
            paths = sorted({_inside(folder, f, ipath) for f in names})
            for p in paths:
                try:
                    found = p.is_file()
                except OSError as e:  # a name too long for the filesystem
                    raise CheckpointError(f"{p}: shard named in {index}: {e.strerror}") from None
                if not found:
                    raise CheckpointError(f"{p}: shard named in {index} is missing")
            return kind, paths
        if (folder / single).is_file():
            return kind, [folder / single]
        paths = sorted(p for p in folder.glob(pattern) if p.is_file())
        if paths:
            return kind, paths
    raise CheckpointError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")


class HFSource:
    """Every tensor of an HF folder: name -> SrcTensor; `read_into` fills one tensor."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.kind, self.files = weight_files(folder)
        self.tensors: dict[str, SrcTensor] = {}
        self._fds: dict[Path, int] = {}
        self._bin: tuple[Path, dict[str, Any]] | None = None  # the one open .bin shard
        for path in self.files:
            if self.kind == "safetensors":
                found = safetensors_header(path)
            else:
                sd = self._state_dict(path)
                found = {}
                for k, v in sd.items():
                    if not isinstance(v, torch.Tensor):
                        raise CheckpointError(f"{path}: entry {k!r} is not a tensor")
                    found[k] = SrcTensor(path, v.dtype, tuple(v.shape), -1)
            for name, t in found.items():
                if name in self.tensors:
                    other = self.tensors[name].file.name
                    raise CheckpointError(f"{path}: tensor {name!r} also appears in {other}")
                self.tensors[name] = t

    def _state_dict(self, path: Path) -> dict[str, Any]:
        if self._bin is None or self._bin[0] != path:
            self._bin = None  # drop the previous shard's mapping first
            self._bin = (path, _torch_load(path))
        return self._bin[1]

    def read(self, name: str) -> torch.Tensor:
        """A fresh tensor holding the source tensor `name` (its own dtype)."""
        t = self.tensors[name]
        out = torch.empty(t.shape, dtype=t.dtype)
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill `out` (contiguous, the tensor's shape, any dtype) with tensor `name`, cast to
        out's dtype. Same dtype from safetensors: read straight into out's bytes."""
        t = self.tensors[name]
        if tuple(out.shape) != t.shape:
            raise CheckpointError(f"{t.file}: tensor {name!r} shape {t.shape} != {out.shape}")
        if t.start < 0:
            out.copy_(self._state_dict(t.file)[name])
            return
        if out.dtype != t.dtype:
            tmp = torch.empty(t.shape, dtype=t.dtype)
            self.read_into(name, tmp)
            out.copy_(tmp)
            return
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        fd = self._fds.get(t.file)
        if fd is None:
            fd = self._fds[t.file] = os.open(t.file, os.O_RDONLY)
        done = 0
        try:
            while done < t.nbytes:
                got = os.preadv(fd, [view[done:]], t.start + done)
                if got == 0:
                    raise CheckpointError(f"{t.file}: truncated while reading tensor {name!r}")
                done += got
        except OSError as e:
            raise CheckpointError(f"{t.file}: read of tensor {name!r} failed ({e})") from None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._bin = None
