"""convert() is strict and atomic; ensure_converted() converts a plain HF folder once."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zeroinf.convert as zc
from zeroinf.convert import convert, ensure_converted
from zeroinf.errors import CheckpointError, ConfigError
from zeroinf.format import Checkpoint, tensor_views


def edited(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """A copy of the single-file HF folder `src` whose weights went through `edit`."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors")
    return dst


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("zi"))


def test_missing_tensor_named(tiny_hf: Callable[..., Path], tmp_path: Path) -> None:
    name = "model.layers.1.mlp.up_proj.weight"
    src = edited(tiny_hf("llama", "single"), tmp_path / "hf", lambda sd: sd.pop(name))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' \\(unit layers.1\\) is not in"):
        convert(src, tmp_path / "zi", progress=False)
    assert leftovers(tmp_path) == []


def test_leftover_tensor_named(tiny_hf: Callable[..., Path], tmp_path: Path) -> None:
    def add(sd: dict[str, torch.Tensor]) -> None:
        sd["model.layers.0.mlp.extra.weight"] = torch.ones(3)

    src = edited(tiny_hf("llama", "single"), tmp_path / "hf", add)
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.extra.weight' is left over"):
        convert(src, tmp_path / "zi", progress=False)
    assert leftovers(tmp_path) == []


def test_tied_head_that_differs_is_left_over(tiny_hf: Callable[..., Path], tmp_path: Path) -> None:
    def add(sd: dict[str, torch.Tensor]) -> None:
        sd["lm_head.weight"] = sd["model.decoder.embed_tokens.weight"] + 1

    src = edited(tiny_hf("opt", "single"), tmp_path / "hf", add)
    with pytest.raises(CheckpointError, match="'lm_head.weight' is left over"):
        convert(src, tmp_path / "zi", progress=False)


def test_ignored_buffer_skipped(tiny_hf: Callable[..., Path], tmp_path: Path) -> None:
    """Old Llama checkpoints carry rotary inv_freq buffers; transformers ignores them, so do we."""

    def add(sd: dict[str, torch.Tensor]) -> None:
        sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    src = edited(tiny_hf("llama", "single"), tmp_path / "hf", add)
    ckpt = Checkpoint(convert(src, tmp_path / "zi", progress=False))
    assert all("inv_freq" not in t.name for u in ckpt.units for t in u.tensors)


def test_base_prefix_quirk(tiny_hf: Callable[..., Path], tmp_path: Path) -> None:
    """Original OPT checkpoints name tensors "decoder.*" (no "model."); the manifest keeps the
    names the family asks for."""

    def strip(sd: dict[str, torch.Tensor]) -> None:
        for k in list(sd):
            sd[k.removeprefix("model.")] = sd.pop(k)

    src = edited(tiny_hf("opt", "single"), tmp_path / "hf", strip)
    ckpt = Checkpoint(convert(src, tmp_path / "zi", progress=False))
    source = load_file(src / "model.safetensors")
    u = ckpt.manifest.unit("layers.2")
    buf = ckpt.read_unit(u, torch.empty(u.nbytes, dtype=torch.uint8))
    for name, t in tensor_views(u, buf).items():
        assert name.startswith("model.decoder.layers.2.")
        assert torch.equal(t, source[name.removeprefix("model.")])


def test_unsupported_model_type(tiny_hf: Callable[..., Path], tmp_path: Path) -> None:
    src = Path(shutil.copytree(tiny_hf("llama", "single"), tmp_path / "hf"))
    (src / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="'bert' is not supported \\(supported: .*llama.*opt"):
        convert(src, tmp_path / "zi", progress=False)


def _fail_on_unit(monkeypatch: pytest.MonkeyPatch, n: int, exc: BaseException) -> None:
    real, calls = zc._write_unit, []

    def write_unit(path: Path, data: torch.Tensor) -> int:
        calls.append(path)
        if len(calls) == n:
            raise exc
        return real(path, data)

    monkeypatch.setattr(zc, "_write_unit", write_unit)


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("injected"), KeyboardInterrupt(), OSError(errno.ENOSPC, "No space left")],
    ids=["exception", "ctrl-c", "enospc"],
)
def test_failure_leaves_nothing(
    tiny_hf: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    exc: BaseException,
) -> None:
    _fail_on_unit(monkeypatch, 3, exc)
    expected = CheckpointError if isinstance(exc, OSError) else type(exc)
    with pytest.raises(expected) as e:
        convert(tiny_hf("llama"), tmp_path / "zi", progress=False)
    if isinstance(exc, OSError):
        assert "disk full" in str(e.value)
    assert leftovers(tmp_path) == []


def test_force_replaces_and_failure_keeps_old(
    tiny_hf: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dst = convert(tiny_hf("llama"), tmp_path / "zi", dtype="float16", progress=False)
    with pytest.raises(CheckpointError, match="already exists"):
        convert(tiny_hf("llama"), dst, progress=False)
    with monkeypatch.context() as m:
        _fail_on_unit(m, 2, RuntimeError("injected"))
        with pytest.raises(RuntimeError):
            convert(tiny_hf("llama"), dst, force=True, progress=False)
    assert Checkpoint(dst).manifest.dtype == "float16"  # the old checkpoint is intact
    assert leftovers(tmp_path) == ["zi"]
    convert(tiny_hf("llama"), dst, dtype="bfloat16", force=True, progress=False)
    Checkpoint(dst).verify_all()
    assert Checkpoint(dst).manifest.dtype == "bfloat16"
    assert leftovers(tmp_path) == ["zi"]


def test_force_refuses_a_non_checkpoint(tiny_hf: Callable[..., Path], tmp_path: Path) -> None:
    (tmp_path / "zi").mkdir()
    (tmp_path / "zi" / "precious.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a zeroinf checkpoint"):
        convert(tiny_hf("llama"), tmp_path / "zi", force=True, progress=False)
    assert (tmp_path / "zi" / "precious.txt").read_text() == "x"


def test_stale_partial_is_replaced(tiny_hf: Callable[..., Path], tmp_path: Path) -> None:
    (tmp_path / "zi.partial").mkdir()
    (tmp_path / "zi.partial" / "junk").write_text("from a killed run")
    dst = convert(tiny_hf("llama"), tmp_path / "zi", progress=False)
    assert not (dst / "junk").exists() and leftovers(tmp_path) == ["zi"]


def test_ensure_converted_once(
    tiny_hf: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = Path(shutil.copytree(tiny_hf("opt"), tmp_path / "hf"))
    cache = tmp_path / "cache"
    first = ensure_converted(src, dtype="float16", cache_dir=cache, progress=False)
    assert first.parent == cache and Checkpoint(first).manifest.dtype == "float16"
    assert ensure_converted(first) == first  # a zeroinf checkpoint is used as is

    def no_convert(*a: object, **k: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(zc, "convert", no_convert)
    assert ensure_converted(src, dtype="float16", cache_dir=cache, progress=False) == first
    monkeypatch.setenv("ZEROINF_CACHE", str(cache))
    assert ensure_converted(src, dtype="float16", progress=False) == first
    monkeypatch.undo()

    # Another dtype, or a changed source, is another cache entry.
    other = ensure_converted(src, dtype="bfloat16", cache_dir=cache, progress=False)
    assert other != first and Checkpoint(other).manifest.dtype == "bfloat16"
    (src / "generation_config.json").write_text('{"eos_token_id": 2}')
    assert ensure_converted(src, dtype="float16", cache_dir=cache, progress=False) != first


def test_ensure_converted_rejects_other_folders(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        ensure_converted(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no manifest.json or config.json"):
        ensure_converted(tmp_path)
