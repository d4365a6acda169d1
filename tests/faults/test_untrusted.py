"""Checkpoints are untrusted input. Unit files stay inside the folder (no "..", no absolute path,
no symlink out); sizes and offsets are checked before anything is read or allocated (a manifest
claiming 10 TB allocates nothing); .bin sources load with weights_only=True only (a pickle with
a malicious __reduce__ never runs); code in a model folder never runs (trust_remote_code is
never enabled, even when stdin says "y"); dtypes come from a closed list."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from fault_helpers import host_buffers, open_fds, record_cases
from safetensors.torch import load_file, save_file

import zeroinf
import zeroinf.engine.prefetcher as prefetcher
import zeroinf.io.memory as memory
from zeroinf.cli.generate import load_tokenizer
from zeroinf.cli.generate import main as generate_main
from zeroinf.convert import convert
from zeroinf.errors import CheckpointError, PlanError
from zeroinf.format import DTYPES, MAX_MANIFEST_BYTES, Checkpoint

TiB = 1 << 40


def edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    return path


@pytest.fixture
def copy(ckpt: Path, tmp_path: Path) -> Path:
    """A private copy of the converted tiny Llama, inside tmp_path/ck (tmp_path/outside is not
    in the checkpoint)."""
    (tmp_path / "outside").mkdir()
    return Path(shutil.copytree(ckpt, tmp_path / "ck"))


@pytest.fixture
def allocations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, int]]]:
    """Every host or device buffer zeroinf makes for weights (aligned_empty, PinnedArena, the
    prefetcher's slots), recorded instead of silently happening."""
    made: list[tuple[str, int]] = []
    real_empty, real_arena = memory.aligned_empty, prefetcher.PinnedArena

    def aligned_empty(nbytes: int, pin: bool = False) -> torch.Tensor:
        made.append(("aligned_empty", nbytes))
        return real_empty(nbytes, pin)

    def arena(sizes: Any, *a: Any, **k: Any) -> Any:
        made.append(("PinnedArena", sizes if isinstance(sizes, int) else sum(sizes)))
        return real_arena(sizes, *a, **k)

    monkeypatch.setattr(memory, "aligned_empty", aligned_empty)
    monkeypatch.setattr(prefetcher, "aligned_empty", aligned_empty)
    monkeypatch.setattr(prefetcher, "PinnedArena", arena)
    yield made


@pytest.fixture
def no_leaks() -> Iterator[None]:
    fds, bufs = open_fds(), host_buffers()
    yield
    assert (open_fds(), host_buffers()) == (fds, bufs)


# ---- paths: unit files stay inside the checkpoint folder ----

LAYER1 = 2  # index of unit layers.1 (file 2-layers.1.bin)


def _outside(copy: Path) -> str:
    out = copy.parent / "outside" / "2-layers.1.bin"
    shutil.copyfile(copy / "2-layers.1.bin", out)  # right size and bytes: only the path is wrong
    return str(out)


PATH_CASES: dict[str, tuple[Callable[[Path], str], str]] = {
    "dotdot": (lambda c: os.path.relpath(_outside(c), c), "leaves the folder"),
    "absolute": (_outside, "leaves the folder"),
    "dotdot inside": (lambda c: "sub/../../outside/2-layers.1.bin", "leaves the folder"),
    "NUL": (lambda c: "2-layers\x00.bin", "holds a NUL byte"),
    "long name": (
        lambda c: "x" * 300,
        "is not a usable file name (empty, or a part over 255 bytes)",
    ),  # fmt: skip
    "lone surrogate": (lambda c: "\udc80.bin", "is not valid Unicode"),
}


@pytest.mark.parametrize("case", PATH_CASES)
def test_unit_file_outside_the_folder_is_refused(
    copy: Path, case: str, allocations: list, no_leaks: None
) -> None:
    make, why = PATH_CASES[case]
    name = make(copy)
    mpath = edit_manifest(copy, lambda m: m["units"][LAYER1].update(file=name))
    want = f"{mpath} unit 'layers.1': file {name!r} {why}"
    with pytest.raises(CheckpointError) as e:
        Checkpoint(copy)
    assert str(e.value) == want
    with pytest.raises(CheckpointError) as e:
        zeroinf.load(copy, device="cpu", gpu_memory=None, progress=False)
    assert str(e.value) == want
    assert allocations == []
    del e
    record_cases("manifest file path out of the folder", 1)


@pytest.mark.parametrize("link", ["file", "folder"])
def test_symlink_out_of_the_folder_is_refused(
    copy: Path, link: str, allocations: list, no_leaks: None
) -> None:
    outside = _outside(copy)
    if link == "file":
        (copy / "2-layers.1.bin").unlink()
        os.symlink(outside, copy / "2-layers.1.bin")
        where = copy / "2-layers.1.bin"
    else:
        os.symlink(Path(outside).parent, copy / "sub")
        edit_manifest(copy, lambda m: m["units"][LAYER1].update(file="sub/2-layers.1.bin"))
        where = copy / "sub" / "2-layers.1.bin"
    with pytest.raises(CheckpointError) as e:
        zeroinf.load(copy, device="cpu", gpu_memory=None, progress=False)
    assert str(e.value) == f"{where}: resolves outside the checkpoint"
    assert allocations == []
    del e
    record_cases("manifest unit file symlinked out of the folder", 1)


def test_symlink_inside_the_folder_is_fine(ckpt: Path, copy: Path) -> None:
    (copy / "inner").mkdir()
    os.rename(copy / "2-layers.1.bin", copy / "inner" / "real.bin")
    os.symlink("inner/real.bin", copy / "2-layers.1.bin")
    ids = torch.tensor([[1, 7, 9, 11]])
    with zeroinf.load(copy, device="cpu", gpu_memory=None, progress=False) as m:
        got = m.generate(ids, max_new_tokens=4)
    with zeroinf.load(ckpt, device="cpu", gpu_memory=None, progress=False) as m:
        assert torch.equal(got, m.generate(ids, max_new_tokens=4))


@pytest.mark.parametrize("target", ["../outside.safetensors", "ABSOLUTE"])
def test_hf_index_naming_a_shard_outside_is_refused(
    tiny_hf: Callable[..., Path], tmp_path: Path, target: str
) -> None:
    src = Path(shutil.copytree(tiny_hf("llama"), tmp_path / "hf"))
    outside = tmp_path / "outside.safetensors"
    shard = src / "model-00004-of-00004.safetensors"
    shutil.copyfile(shard, outside)
    name = str(outside) if target == "ABSOLUTE" else target
    index = src / "model.safetensors.index.json"
    raw = json.loads(index.read_text())
    raw["weight_map"] = {k: name if v == shard.name else v for k, v in raw["weight_map"].items()}
    index.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as e:
        convert(src, tmp_path / "zi", progress=False)
    assert str(e.value) == f"{index}: shard {name!r} leaves the folder"
    with pytest.raises(CheckpointError) as e2:
        zeroinf.load(src, device="cpu", gpu_memory=None, progress=False, nvme_dir=None)
    assert str(e2.value) == str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "outside.safetensors"]
    record_cases("HF index naming a shard out of the folder", 1)


# ---- sizes and offsets: checked before anything is read or allocated ----


def test_manifest_claiming_10tb_allocates_nothing(
    copy: Path, allocations: list, no_leaks: None
) -> None:
    def grow(m: dict[str, Any]) -> None:
        u = m["units"][LAYER1]
        u["nbytes"] = 10 * TiB
        big = [2**20, 2**20]  # float32 [1M, 1M]: 4 TiB, placed at 4 TiB
        u["tensors"].append(
            {"name": "huge", "dtype": "float32", "shape": big, "offset": 4 * TiB,
             "nbytes": 4 * TiB}
        )  # fmt: skip

    mpath = edit_manifest(copy, grow)
    rss = psutil.Process().memory_info().rss
    tracemalloc.start()
    with pytest.raises(CheckpointError) as e:
        zeroinf.load(copy, device="cpu", gpu_memory=None, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    unit = copy / "2-layers.1.bin"
    assert str(e.value) == f"{unit}: size 339968 != manifest nbytes {10 * TiB} (truncated?)"
    assert allocations == [] and peak < 8 << 20
    assert psutil.Process().memory_info().rss - rss < 64 << 20
    del e
    # the same sizes inside a unit that is not that large: refused on the offsets alone
    edit_manifest(copy, lambda m: m["units"][LAYER1].update(nbytes=339968))
    with pytest.raises(CheckpointError) as e:
        Checkpoint(copy)
    assert str(e.value) == (
        f"{mpath} unit 'layers.1' tensor 'huge': offset {4 * TiB} not 4096-aligned or past "
        "the unit's 339968 bytes"
    )
    del e
    record_cases("manifest claiming 10 TB", 2)


def sparse(path: Path, nbytes: int) -> None:
    try:
        os.truncate(path, nbytes)
    except OSError as e:
        pytest.skip(f"this filesystem holds no sparse file of {nbytes} bytes ({e.strerror})")


@pytest.fixture
def ten_tb(copy: Path) -> Path:
    """The copy with unit layers.1 a real (sparse) 10 TiB file and a manifest to match."""
    sparse(copy / "2-layers.1.bin", 10 * TiB)
    edit_manifest(copy, lambda m: m["units"][LAYER1].update(nbytes=10 * TiB))
    return copy


@pytest.mark.parametrize("offload", ["cpu", "nvme"])
def test_a_real_10tb_unit_is_refused_by_the_plan(
    ten_tb: Path, offload: str, allocations: list, no_leaks: None
) -> None:
    with pytest.raises(PlanError) as e:
        zeroinf.load(ten_tb, device="cpu", offload=offload, gpu_memory="1GiB", progress=False)
    assert str(e.value) == (
        "gpu_memory 1.00 GiB cannot hold 2 streaming slot(s) of 10.00 TiB (the largest unit): "
        "need at least 20.00 TiB; raise gpu_memory or lower prefetch"
    )
    assert allocations == []
    del e
    record_cases("a real (sparse) 10 TB unit", 1)


def test_a_real_10tb_unit_resident_on_the_cpu_is_refused_by_the_plan(
    ten_tb: Path, allocations: list
) -> None:
    with pytest.raises(PlanError):
        zeroinf.load(ten_tb, device="cpu", gpu_memory=None, progress=False)
    assert allocations == []


def test_oversized_manifest_is_not_read(copy: Path) -> None:
    mpath = copy / "manifest.json"
    sparse(mpath, MAX_MANIFEST_BYTES + 1)
    tracemalloc.start()
    with pytest.raises(CheckpointError) as e:
        Checkpoint(copy)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(e.value) == (
        f"{mpath}: {MAX_MANIFEST_BYTES + 1} bytes is over the {MAX_MANIFEST_BYTES} byte limit "
        "of a manifest"
    )
    assert peak < 1 << 20
    record_cases("manifest of 64 MiB + 1", 1)


def write_safetensors(
    path: Path, header: dict[str, Any], data: bytes, n: int | None = None
) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if n is None else n) + raw + data)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [-96], "data_offsets": [0, 384]},  # negative dims
        {"dtype": "F32", "shape": [95.9], "data_offsets": [0, 384]},  # int(95.9) == 95
        {"dtype": "F32", "shape": "96", "data_offsets": [0, 384]},  # a string's digits
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [96], "data_offsets": ["0", "384"]},
        {"dtype": "F32", "shape": [96], "data_offsets": [0, 384, 768]},
        {"dtype": "PICKLE", "shape": [96], "data_offsets": [0, 384]},
        {"dtype": ["F32"], "shape": [96], "data_offsets": [0, 384]},
    ],
    ids=["negative", "float", "string", "bool", "offsets", "3 offsets", "dtype", "dtype list"],
)
def test_safetensors_entries_are_strictly_typed(
    tiny_hf: Callable[..., Path], tmp_path: Path, entry: dict[str, Any]
) -> None:
    src = Path(shutil.copytree(tiny_hf("llama", "single"), tmp_path / "hf"))
    path = src / "model.safetensors"
    header, data = {}, b""
    for name, t in load_file(path).items():  # the same file, its header written by hand
        raw = t.numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}  # fmt: skip
        data += raw
    header["model.norm.weight"] = entry
    write_safetensors(path, header, data)
    with pytest.raises(CheckpointError) as e:
        convert(src, tmp_path / "zi", progress=False)
    assert str(e.value) == f"{path}: corrupt safetensors entry for tensor 'model.norm.weight'"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    record_cases("safetensors entry of the wrong types", 1)


def test_safetensors_header_length_is_checked_before_reading(tmp_path: Path) -> None:
    from zeroinf.hf_source import safetensors_header

    path = tmp_path / "model.safetensors"
    write_safetensors(path, {}, b"", n=2**62)
    tracemalloc.start()
    with pytest.raises(CheckpointError) as e:
        safetensors_header(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    size = path.stat().st_size
    assert str(e.value) == (
        f"{path}: truncated or corrupt safetensors file (header length {2**62}, file has "
        f"{size} bytes)"
    )
    assert peak < 1 << 20
    record_cases("safetensors header claiming 4 EiB", 1)


# ---- no code from a checkpoint ever runs ----


class Evil:
    """Unpickling this runs `touch MARKER` (with plain pickle or weights_only=False)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def evil_bin(kind: str, path: Path, marker: Path) -> None:
    sd: dict[str, Any] = {"model.embed_tokens.weight": torch.zeros(4), "x": Evil(marker)}
    if kind == "zip":
        torch.save(sd, path)
    elif kind == "legacy":
        torch.save(sd, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(sd))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_malicious_pickle_never_runs(
    tiny_hf: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    src = Path(shutil.copytree(tiny_hf("llama", "single"), tmp_path / "hf"))
    (src / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    evil_bin(kind, src / "pytorch_model.bin", marker)
    calls: list[dict[str, Any]] = []
    real = torch.load

    def spy(*a: Any, **k: Any) -> Any:
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    monkeypatch.setenv("ZEROINF_CACHE", str(tmp_path / "cache"))
    prefix = f"{src / 'pytorch_model.bin'}: unreadable PyTorch weights (Weights only load failed"
    with pytest.raises(CheckpointError) as e:
        convert(src, tmp_path / "zi", progress=False)
    assert str(e.value).startswith(prefix)
    with pytest.raises(CheckpointError) as e:
        zeroinf.load(src, device="cpu", gpu_memory=None, progress=False)
    assert str(e.value).startswith(prefix)
    del e
    assert not marker.exists()
    assert calls and all(k.get("weights_only") is True for k in calls)
    assert not (tmp_path / "zi").exists() and not (tmp_path / "zi.partial").exists()
    record_cases(f"malicious pickle ({kind})", 2)


EVIL_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
class EvilModel(LlamaForCausalLM): pass
class EvilTok(PreTrainedTokenizerFast): pass
class EvilConfig: pass
"""


@pytest.fixture
def remote_code_folder(tiny_hf: Callable[..., Path], tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Llama folder whose config and tokenizer config point at code in the folder."""
    src = Path(shutil.copytree(tiny_hf("llama"), tmp_path / "hf"))
    marker = tmp_path / "PWNED"
    for name in ("modeling_evil.py", "tokenization_evil.py", "configuration_evil.py"):
        (src / name).write_text(EVIL_CODE.format(marker=str(marker)))
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
        "AutoTokenizer": ["tokenization_evil.EvilTok", "tokenization_evil.EvilTok"],
    }
    (src / "config.json").write_text(json.dumps(cfg))
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTok", "tokenization_evil.EvilTok"]}
    tc["tokenizer_class"] = "EvilTok"
    (src / "tokenizer_config.json").write_text(json.dumps(tc))
    return src, marker


def test_code_in_a_model_folder_never_runs(
    remote_code_folder: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src, marker = remote_code_folder
    # transformers asks on stdin whether to run a folder's code unless told not to: answer yes
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    monkeypatch.setenv("ZEROINF_CACHE", str(tmp_path / "cache"))
    dst = convert(src, tmp_path / "zi", progress=False)
    assert not any(p.suffix == ".py" for p in dst.iterdir())  # code is not copied along
    assert load_tokenizer(dst, src) is None  # refused (with a warning), never run
    with zeroinf.load(src, device="cpu", gpu_memory=None, progress=False) as m:
        m.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=2)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": 1, "input_ids": [1, 5, 9]}) + "\n")
    out = tmp_path / "out.jsonl"
    code = generate_main(["--model", str(src), "--input", str(inp), "--output", str(out),
                          "--device", "cpu", "--max-new-tokens", "3", "--quiet"])  # fmt: skip
    capsys.readouterr()
    assert code == 0 and json.loads(out.read_text())["id"] == 1
    assert not marker.exists()
    assert not {"modeling_evil", "tokenization_evil", "configuration_evil"} & set(sys.modules)
    record_cases("model folder with custom code (auto_map, stdin 'y')", 4)


# ---- dtypes from a closed list ----

BAD_DTYPES = ["float64", "complex64", "bool", "object", "float8_e4m3fn", ["float32"], {}, 5, None]


@pytest.mark.parametrize("where", ["manifest", "tensor"])
def test_dtypes_come_from_a_closed_list(copy: Path, where: str, allocations: list) -> None:
    for bad in BAD_DTYPES:
        raw = json.loads((copy / "manifest.json").read_text())
        if where == "manifest":
            raw["dtype"] = bad
        else:
            raw["dtype"] = "float32"
            raw["units"][LAYER1]["tensors"][0]["dtype"] = bad
        mpath = copy / "manifest.json"
        mpath.write_text(json.dumps(raw))
        if where == "manifest":
            what = f"{mpath}: dtype {bad!r} not in {sorted(DTYPES)}"
        else:
            what = (
                f"{mpath} unit 'layers.1' tensor 'model.layers.1.input_layernorm.weight': "
                f"dtype {bad!r} not in {sorted(DTYPES)}"
            )
        with pytest.raises(CheckpointError) as e:
            zeroinf.load(copy, device="cpu", gpu_memory=None, progress=False)
        assert str(e.value) == what
        del e
    assert allocations == []
    record_cases(f"{where} dtype outside the closed list", len(BAD_DTYPES))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int16])
def test_source_tensor_dtype_outside_the_list(
    tiny_hf: Callable[..., Path], tmp_path: Path, dtype: torch.dtype
) -> None:
    src = Path(shutil.copytree(tiny_hf("llama", "single"), tmp_path / "hf"))
    sd = load_file(src / "model.safetensors")
    sd["model.norm.weight"] = torch.ones(sd["model.norm.weight"].shape, dtype=dtype)
    save_file(sd, src / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        convert(src, tmp_path / "zi", progress=False)
    assert str(e.value) == (
        f"{src / 'model.safetensors'}: tensor 'model.norm.weight' has unsupported dtype {dtype}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    record_cases("source tensor dtype outside the list", 1)


# ---- what the manifest says must fit the model family (engine-owned checks) ----


def test_manifest_missing_a_tensor_is_named(copy: Path) -> None:
    name = "model.layers.1.mlp.up_proj.weight"
    edit_manifest(
        copy,
        lambda m: m["units"][LAYER1].update(
            tensors=[t for t in m["units"][LAYER1]["tensors"] if t["name"] != name]
        ),
    )
    with pytest.raises(CheckpointError, match=f"layers.1.*{name}"):
        zeroinf.load(copy, device="cpu", gpu_memory=None, progress=False)


def test_manifest_tensor_of_the_wrong_shape_is_named(copy: Path) -> None:
    name = "model.layers.1.self_attn.q_proj.weight"

    def reshape(m: dict[str, Any]) -> None:
        for t in m["units"][LAYER1]["tensors"]:
            if t["name"] == name:
                t["shape"] = [48, 192]  # [96, 96] in the config; the same bytes

    edit_manifest(copy, reshape)
    with pytest.raises(CheckpointError, match=f"{name}.*48, 192"):
        with zeroinf.load(copy, device="cpu", gpu_memory=None, progress=False) as m:
            m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)


def test_config_value_of_the_wrong_type_is_named(copy: Path) -> None:
    edit_manifest(copy, lambda m: m["config"].update(hidden_size="96"))
    from zeroinf.errors import ConfigError

    with pytest.raises(ConfigError, match="hidden_size"):
        zeroinf.load(copy, device="cpu", gpu_memory=None, progress=False)
