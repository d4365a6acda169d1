"""A Hugging Face folder -> a zeroinf checkpoint (docs/format.md), streaming and atomic.

Memory: one reusable buffer the size of the largest unit, plus one source tensor when it must
be cast. Each unit is built in the buffer, written with one write (fsynced in the background
while the next unit is read), and its CRC32 taken from the same bytes. Everything goes to
DST.partial/, which is renamed to DST at the end; any failure (an exception, Ctrl-C, a full
disk) removes DST.partial/ and leaves no DST.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from zeroinf.errors import CheckpointError, ConfigError
from zeroinf.format import (
    DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    TensorEntry,
    UnitEntry,
    dtype_name,
    layout,
    write_manifest,
)
from zeroinf.hf_source import HFSource, SrcTensor

FLOAT_DTYPES = ("bfloat16", "float16", "float32")
# Copied beside the manifest so DST is self-contained (tokenizer, chat template, generation).
AUX_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "vocab*",
    "merges.txt",
    "*.tiktoken",
    "spiece.model",
)


@dataclass(frozen=True)
class Quantization:
    """Weight-only group-wise quantization of linear weights (kernels.quant's packed layout)."""

    bits: int  # 4 or 8
    group_size: int = 64
    scheme: str = "sym"  # "sym" | "asym" (int4 only)
    head: bool = False  # also the LM head (embeddings are never quantized: they are gathered)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"--quantize: int{self.bits} is not supported (int4 or int8)")
        if self.group_size < 32 or self.group_size & (self.group_size - 1):
            raise ConfigError(f"--group-size {self.group_size}: a power of two >= 32")
        if self.scheme not in ("sym", "asym") or (self.bits == 8 and self.scheme != "sym"):
            raise ConfigError(f"--quant-scheme {self.scheme!r}: int4 sym|asym, int8 sym")

    def applies(self, unit: str, name: str, shape: tuple[int, ...]) -> bool:
        """Linear weights [N, K] of the decoder layers (and the head when asked); matrices with
        fewer rows than a group (a MoE router) stay in float."""
        in_scope = unit.startswith("layers.") or (self.head and unit == "head")
        return (
            in_scope
            and name.endswith(".weight")
            and len(shape) == 2
            and shape[0] >= self.group_size
            and shape[1] % self.group_size == 0
        )

    def parts(self, shape: tuple[int, ...]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(suffix, dtype, shape) of what one quantized [N, K] weight is stored as."""
        n, k = shape
        q = (
            ("qweight", torch.int8, (n, k))
            if self.bits == 8
            else ("qweight", torch.uint8, (n, k // 2))
        )
        out = [q, ("scales", torch.float16, (k // self.group_size, n))]
        if self.scheme == "asym":
            out.append(("zeros", torch.float16, (k // self.group_size, n)))
        return out

    def to_json(self, names: list[str]) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "scheme": self.scheme,
                "scale_dtype": "float16", "tensors": sorted(names)}  # fmt: skip


@dataclass(frozen=True)
class _Placed:
    name: str  # the HF tensor name the family asked for (manifest name; + ".qweight" etc.)
    src: str  # the name in the source files (may differ by a "model." prefix)
    dtype: torch.dtype  # stored dtype
    shape: tuple[int, ...] | None = None  # stored shape when it is a quantized part
    part: str | None = None  # "qweight" | "scales" | "zeros" of a quantized weight


def _read_config(src: Path) -> dict:
    if not src.is_dir():
        raise CheckpointError(f"{src}: source folder does not exist")
    path = src / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{src}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(path.read_bytes())
        assert isinstance(config, dict)
    except (OSError, ValueError, AssertionError, RecursionError):
        raise CheckpointError(f"{path}: not a readable JSON object") from None
    return config


def _family_units(config: dict, where: Path) -> list[tuple[str, dict[str, str]]]:
    from zeroinf.models import SUPPORTED_MODEL_TYPES, ModelConfig, get_family

    mt = config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{where}: model_type {mt!r} is not supported "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )
    return get_family(mt).unit_tensors(ModelConfig.from_hf(config))


def _resolve(name: str, tensors: dict[str, SrcTensor]) -> str | None:
    """The source name of HF tensor `name`: exact, or differing by the base-model prefix (old OPT
    checkpoints store "decoder.layers..." for "model.decoder.layers...")."""
    for cand in (name, name.removeprefix("model."), "model." + name):
        if cand in tensors:
            return cand
    return None


def default_dtype(config: dict, source: HFSource) -> str:
    """The config's dtype, else the float dtype holding most of the source's bytes."""
    for key in ("dtype", "torch_dtype"):
        if config.get(key) in FLOAT_DTYPES:
            return config[key]
    by_dtype: dict[torch.dtype, int] = {}
    for t in source.tensors.values():
        if t.dtype.is_floating_point:
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    if not by_dtype:
        raise ConfigError(f"{source.folder}: no float tensors to take a dtype from; pass --dtype")
    top = max(by_dtype, key=by_dtype.__getitem__)
    if top not in (torch.float32, torch.float16, torch.bfloat16):
        raise ConfigError(f"{source.folder}: source tensors are {top}; pass --dtype")
    return dtype_name(top)


def plan_units(
    model_type: str,
    units: list[tuple[str, dict[str, str]]],
    source: HFSource,
    dtype: torch.dtype,
    quant: Quantization | None = None,
) -> list[tuple[str, list[_Placed]]]:
    """Place every source tensor in exactly one unit (the tied head copy aside), or raise naming
    the missing or left-over tensor. Tensors transformers itself ignores on load (saved buffers
    such as rotary inv_freq; zeroinf.models.is_ignored_tensor) are skipped."""
    from zeroinf.models import is_ignored_tensor

    placed: list[tuple[str, list[_Placed]]] = []
    owner: dict[str, str] = {}
    for unit, table in units:
        entries: dict[str, _Placed] = {}
        for hf in table.values():
            src = _resolve(hf, source.tensors)
            if src is None:
                raise CheckpointError(
                    f"{source.folder}: tensor {hf!r} (unit {unit}) is not in the source weights"
                )
            if hf in entries:
                continue
            if src in owner and {owner[src], unit} != {"embed", "head"}:
                raise CheckpointError(
                    f"{source.folder}: tensor {hf!r} is placed in two units ({owner[src]}, {unit})"
                )
            owner.setdefault(src, unit)
            t = source.tensors[src]
            if t.dtype.is_floating_point:
                out = dtype
            elif t.dtype in DTYPES.values():
                out = t.dtype
            else:
                raise CheckpointError(f"{t.file}: tensor {src!r} has unsupported dtype {t.dtype}")
            if quant is not None and out.is_floating_point and quant.applies(unit, hf, t.shape):
                for part, pdtype, pshape in quant.parts(t.shape):
                    entries[f"{hf}.{part}"] = _Placed(f"{hf}.{part}", src, pdtype, pshape, part)
                continue
            entries[hf] = _Placed(hf, src, out)
        placed.append((unit, list(entries.values())))
    tied = [p.src for u, ps in placed if u == "head" for p in ps if owner[p.src] == "embed"]
    for name, t in source.tensors.items():
        if name in owner or is_ignored_tensor(model_type, name):
            continue
        if not any(_same_tensor(source, name, tw) for tw in tied):
            raise CheckpointError(
                f"{t.file}: tensor {name!r} is left over (no unit of this model uses it)"
            )
    return placed


def _same_tensor(source: HFSource, a: str, b: str) -> bool:
    """A tied model's checkpoint may also hold the head as its own copy of the embedding."""
    ta, tb = source.tensors[a], source.tensors[b]
    if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
        return False
    return torch.equal(source.read(a), source.read(b))


def _write_all(fd: int, view: memoryview) -> None:
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])


def _write_unit(path: Path, data: torch.Tensor) -> int:
    """Write `data` (uint8) as the whole file; returns the CRC32 of the bytes. The caller fsyncs
    (in the background, so the disk writes back unit j while unit j+1 is read)."""
    view = memoryview(data.numpy())
    crc: list[int] = []
    # zlib.crc32 releases the GIL: checksum the buffer while the same bytes are written.
    th = threading.Thread(target=lambda: crc.append(zlib.crc32(view)))
    th.start()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, view)
        finally:
            os.close(fd)
    finally:
        th.join()
    return crc[0]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_aux(src: Path, dst: Path) -> None:
    names = sorted({p.name for pat in AUX_PATTERNS for p in src.glob(pat) if p.is_file()})
    for name in names:
        shutil.copyfile(src / name, dst / name)
        _fsync(dst / name)


def _quantize(source: HFSource, name: str, quant: Quantization) -> dict[str, torch.Tensor]:
    from kernels.quant import quantize

    w = torch.empty(source.tensors[name].shape, dtype=torch.float32)
    source.read_into(name, w)
    return quantize(w, quant.bits, quant.group_size, quant.scheme, scale_dtype=torch.float16)


def _fill(
    buf: torch.Tensor,
    placed: list[_Placed],
    offsets: list[int],
    size: int,
    source: HFSource,
    bar: tqdm,
    quant: Quantization | None = None,
) -> tuple[TensorEntry, ...]:
    """Build one unit in buf[:size]: each tensor at its offset, padding zeroed (stable CRC)."""
    tensors, end = [], 0
    quantized: tuple[str, dict[str, torch.Tensor]] | None = None  # (src, parts) of the last one
    for p, off in zip(placed, offsets, strict=True):
        shape = p.shape or source.tensors[p.src].shape
        nb = math.prod(shape) * p.dtype.itemsize
        buf[end:off].zero_()
        dest = buf[off : off + nb].view(p.dtype).view(shape)
        if p.part is None:
            source.read_into(p.src, dest)
        else:  # a quantized weight's parts are adjacent: quantize once, copy each part
            if quantized is None or quantized[0] != p.src:
                quantized = (p.src, _quantize(source, p.src, quant))
            dest.copy_(quantized[1][p.part])
        tensors.append(TensorEntry(p.name, dtype_name(p.dtype), shape, off, nb))
        end = off + nb
        bar.update(nb)
    buf[end:size].zero_()
    bar.update(size - sum(t.nbytes for t in tensors))
    return tuple(tensors)


def _build(
    src: Path,
    out: Path,
    config: dict,
    plan: list[tuple[str, list[_Placed]]],
    source: HFSource,
    dtype: str,
    progress: bool,
    quant: Quantization | None = None,
) -> None:
    layouts = [
        layout([(p.name, p.dtype, p.shape or source.tensors[p.src].shape) for p in ps])
        for _, ps in plan
    ]
    buf = torch.empty(max(size for _, size in layouts), dtype=torch.uint8)  # reused by every unit
    width = len(str(len(plan) - 1))
    entries, synced = [], []
    bar = tqdm(
        total=sum(size for _, size in layouts),
        unit="B",
        unit_scale=True,
        desc=f"convert {src.name}",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    # One thread fsyncs unit j while unit j+1 is read: disk writeback overlaps the reads, and
    # the dirty pages live in the page cache, not in a second buffer of ours.
    with bar, ThreadPoolExecutor(1, thread_name_prefix="zeroinf-fsync") as fsyncer:
        for j, ((unit, placed), (offsets, size)) in enumerate(zip(plan, layouts, strict=True)):
            bar.set_postfix_str(f"unit {j + 1}/{len(plan)} {unit}", refresh=False)
            tensors = _fill(buf, placed, offsets, size, source, bar, quant)
            file = f"{j:0{width}d}-{unit}.bin"
            crc = _write_unit(out / file, buf[:size])
            synced.append(fsyncer.submit(_fsync, out / file))
            entries.append(UnitEntry(unit, file, size, crc, tensors))
        for f in synced:
            f.result()  # an fsync error (EIO, ENOSPC on some filesystems) surfaces here
    _copy_aux(src, out)
    qnames = [p.name.rsplit(".", 1)[0] for _, ps in plan for p in ps if p.part == "qweight"]
    qblock = quant.to_json(qnames) if quant is not None else None
    write_manifest(out, Manifest(dtype, config, tuple(entries), qblock))
    _fsync(out)


def _check_dst(src: Path, dst: Path, force: bool) -> None:
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: DST is the source folder")
    if not dst.exists() and not dst.is_symlink():
        return
    if not force:
        raise CheckpointError(f"{dst}: already exists (pass --force to replace it)")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / MANIFEST).is_file():
        raise CheckpointError(f"{dst}: exists and is not a zeroinf checkpoint; not replacing it")


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    dtype: str | None = None,
    force: bool = False,
    progress: bool = True,
    quantize: Quantization | None = None,
) -> Path:
    """Convert the HF folder `src` into a zeroinf checkpoint at `dst`; returns `dst`.
    quantize: store the decoder layers' linear weights group-wise int4/int8 (docs/format.md).

    dtype: "bfloat16" | "float16" | "float32" for float tensors (integer tensors are kept);
    None keeps the source's dtype. force: replace an existing zeroinf checkpoint at dst.
    Raises CheckpointError / ConfigError with a one-line message naming the file or tensor.
    """
    src, dst = Path(src), Path(dst)
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
    config = _read_config(src)
    units = _family_units(config, src / "config.json")
    _check_dst(src, dst, force)
    source = HFSource(src)
    partial = dst.absolute().with_name(dst.absolute().name + ".partial")
    try:
        dtype = dtype or default_dtype(config, source)
        plan = plan_units(config["model_type"], units, source, DTYPES[dtype], quantize)
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed run
        partial.mkdir(parents=True)
        _build(src, partial, config, plan, source, dtype, progress, quantize)
        if dst.exists() or dst.is_symlink():  # --force: swap, then drop the old checkpoint
            old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
            os.rename(dst, old)
            os.rename(partial, dst)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(partial, dst)
        _fsync(dst.parent)
    except BaseException as e:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(
                f"{dst}: disk full ({e.strerror}) while converting; removed {partial.name}"
            ) from None
        if isinstance(e, OSError):  # EFBIG (a file size limit), EIO, EACCES: name DST
            at = f" on {e.filename}" if e.filename else ""
            raise CheckpointError(
                f"{dst}: {e.strerror or e}{at} while converting; removed {partial.name}"
            ) from None
        raise
    finally:
        source.close()
    return dst


def cache_key(src: Path, dtype: str | None) -> str:
    """Stable across runs; changes when any top-level file of `src` changes (size or mtime)."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in src.iterdir())
    raw = json.dumps([str(src.resolve()), files, dtype or "auto", FORMAT_VERSION])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def ensure_converted(
    path: str | os.PathLike[str],
    dtype: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """`path` if it is a zeroinf checkpoint; for a plain HF folder, its conversion in the cache
    (cache_dir, else $ZEROINF_CACHE, else ~/.cache/zeroinf), made on first use and reused."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no manifest.json or config.json"
        raise CheckpointError(f"{path}: {what} (need a zeroinf checkpoint or a HF model folder)")
    root = Path(cache_dir or os.environ.get("ZEROINF_CACHE") or Path.home() / ".cache/zeroinf")
    dst = root / f"{path.resolve().name}-{dtype or 'auto'}-{cache_key(path, dtype)}"
    if (dst / MANIFEST).is_file():
        return dst
    root.mkdir(parents=True, exist_ok=True)
    # One converter per cache entry: a second process waits here, then finds it done.
    with open(root / f"{dst.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dst / MANIFEST).is_file():
            t0 = time.perf_counter()
            if progress:
                print(f"zeroinf: converting {path} into {dst} (once)", file=sys.stderr)
            convert(path, dst, dtype=dtype, force=True, progress=progress)
            if progress:
                print(f"zeroinf: converted in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return dst
