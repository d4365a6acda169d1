"""Round trip: tiny checkpoints saved by transformers -> zeroinf -> every tensor read back from the
unit files equals the source tensor (bit for bit at the same dtype, the source cast otherwise).
Oracle: the source files read by safetensors / torch.load themselves, and the files' bytes."""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zeroinf.convert import convert
from zeroinf.format import DTYPES, Checkpoint, tensor_views
from zeroinf.models import ModelConfig, get_family

ALIGN = 4096
CASES = [
    # model_type, weights, source dtype, --dtype
    ("llama", "sharded", torch.float32, None),
    ("llama", "sharded", torch.float32, "bfloat16"),
    ("llama", "sharded", torch.float32, "float16"),
    ("llama", "single", torch.bfloat16, None),
    ("llama", "bin", torch.float32, None),
    ("llama", "bin", torch.float32, "bfloat16"),
    ("opt", "sharded", torch.float32, None),
    ("opt", "sharded", torch.float32, "float16"),
    ("opt", "single", torch.float16, "float32"),
    ("opt", "bin", torch.float32, None),
    # the other families' tables (zeroinf.models), once each
    ("mistral", "sharded", torch.float32, None),
    ("qwen2", "sharded", torch.float32, "bfloat16"),
    ("mixtral", "sharded", torch.float32, None),
    ("gpt_neox", "sharded", torch.float32, "float16"),
]


def source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in folder.glob("*.safetensors"):
        out.update(load_file(p))
    for p in folder.glob("pytorch_model*.bin"):
        out.update(torch.load(p, weights_only=True))
    return out


def bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def read_all(ckpt: Checkpoint) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for u in ckpt.units:
        buf = ckpt.read_unit(u, torch.empty(u.nbytes, dtype=torch.uint8))
        out[u.name] = tensor_views(u, buf)
    return out


@pytest.mark.parametrize(
    "model_type,weights,src_dtype,dtype",
    CASES,
    ids=[f"{m}-{w}-{str(s)[6:]}-to-{d}" for m, w, s, d in CASES],
)
def test_round_trip(
    tiny_hf: Callable[..., Path],
    tmp_path: Path,
    model_type: str,
    weights: str,
    src_dtype: torch.dtype,
    dtype: str | None,
) -> None:
    src = tiny_hf(model_type, weights, src_dtype)
    if weights == "sharded":
        assert len(list(src.glob("*.safetensors"))) >= 2
    dst = convert(src, tmp_path / "zi", dtype=dtype, progress=False)
    ckpt = Checkpoint(dst)
    want = DTYPES[dtype] if dtype else src_dtype
    assert ckpt.manifest.dtype == str(want).removeprefix("torch.")
    config = json.loads((src / "config.json").read_text())
    assert ckpt.config == config

    # Units in the family's execution order, each holding exactly the tensors it names.
    family = get_family(model_type)
    table = family.unit_tensors(ModelConfig.from_hf(config))
    assert [u.name for u in ckpt.units] == [name for name, _ in table]
    for u, (_, names) in zip(ckpt.units, table, strict=True):
        assert [t.name for t in u.tensors] == list(dict.fromkeys(names.values()))

    # Every tensor equals the source (cast when asked), bit for bit.
    source = source_tensors(src)
    placed = set()
    for unit, tensors in read_all(ckpt).items():
        for name, t in tensors.items():
            expected = source[name].to(want)
            assert t.dtype == want and t.shape == expected.shape, (unit, name)
            assert bits(t) == bits(expected), (unit, name)
            placed.add(name)
    # Every source tensor is placed; a tied model's saved head copy equals the embedding.
    embed = {t.name for t in ckpt.manifest.unit("embed").tensors}
    tied = [t.name for t in ckpt.manifest.unit("head").tensors if t.name in embed]
    for name in set(source) - placed:
        assert config.get("tie_word_embeddings") and name == "lm_head.weight"
        assert len(tied) == 1 and bits(source[name]) == bits(source[tied[0]])


def test_layout_invariants_and_crc(tiny_hf: Callable[..., Path], tmp_path: Path) -> None:
    dst = convert(tiny_hf("opt"), tmp_path / "zi", progress=False)
    ckpt = Checkpoint(dst)
    for u in ckpt.units:
        data = ckpt.unit_path(u).read_bytes()
        assert len(data) == u.nbytes and u.nbytes % ALIGN == 0
        assert zlib.crc32(data) == u.crc32
        end = 0
        for t in sorted(u.tensors, key=lambda t: t.offset):
            assert t.offset % ALIGN == 0 and t.offset >= end
            assert data[end : t.offset] == bytes(t.offset - end)  # padding is zeros
            end = t.offset + t.nbytes
        assert data[end:] == bytes(len(data) - end)


def test_tied_head_is_a_copy(tiny_hf: Callable[..., Path], tmp_path: Path) -> None:
    """The one exception to "each tensor in one unit": a tied head holds its own copy of the
    embedding, so the head unit streams on its own."""
    ckpt = Checkpoint(convert(tiny_hf("opt"), tmp_path / "zi", progress=False))
    name = "model.decoder.embed_tokens.weight"
    views = read_all(ckpt)
    assert name in views["embed"] and name in views["head"]
    assert bits(views["embed"][name]) == bits(views["head"][name])
    assert ckpt.unit_path(ckpt.manifest.unit("head")) != ckpt.unit_path(ckpt.manifest.unit("embed"))


def test_self_contained(tiny_hf: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_hf("llama")
    dst = convert(src, tmp_path / "zi", progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert (dst / "generation_config.json").read_bytes() == (
        src / "generation_config.json"
    ).read_bytes()
    assert not list(dst.glob("*.safetensors")) and not list(dst.glob("*.index.json"))
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(dst)
    msgs = [{"role": "user", "content": "w1 w2"}]
    assert a("w5 w7 w9")["input_ids"] == b("w5 w7 w9")["input_ids"]
    assert a.apply_chat_template(msgs, tokenize=False) == b.apply_chat_template(
        msgs, tokenize=False
    )
