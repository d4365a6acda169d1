"""Quantized checkpoints (zeroinf-convert --quantize): stored as kernels.quant lays them out,
streamed like any unit, multiplied without materialising the float weight on a GPU. Oracle:
transformers itself with each quantized weight replaced by its dequantized value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import zeroinf
from kernels.quant import dequantize
from zeroinf.cli.convert import main as convert_main
from zeroinf.convert import Quantization, convert
from zeroinf.errors import CheckpointError, ConfigError
from zeroinf.format import Checkpoint, tensor_views
from zeroinf.tiny import save_tiny_hf

NEW = 8


def dequantized_reference(hf: torch.nn.Module, ckpt: Checkpoint) -> torch.nn.Module:
    """transformers' model with every quantized weight set to its dequantized value."""
    q = ckpt.manifest.quantization
    stored: dict[str, torch.Tensor] = {}
    for u in ckpt.units:
        buf = torch.empty(u.nbytes, dtype=torch.uint8)
        stored.update(tensor_views(u, ckpt.read_unit(u, buf)))
    sd = hf.state_dict()
    for name in q["tensors"]:
        w = dequantize(stored[f"{name}.qweight"], stored[f"{name}.scales"],
                       stored.get(f"{name}.zeros"))  # fmt: skip
        assert sd[name].shape == w.shape
        sd[name] = w
    hf.load_state_dict(sd)
    return hf


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("bits,scheme", [(8, "sym"), (4, "sym"), (4, "asym")])
def test_quantized_matches_transformers_on_dequantized_weights(
    tmp_path: Path, family: str, bits: int, scheme: str
) -> None:
    hf = save_tiny_hf(tmp_path / "hf", family, seed=9)
    quant = Quantization(bits, group_size=32, scheme=scheme)
    path = convert(tmp_path / "hf", tmp_path / "zi", progress=False, quantize=quant)
    ckpt = Checkpoint(path)
    q = ckpt.manifest.quantization
    assert q["bits"] == bits and q["scheme"] == scheme and q["group_size"] == 32
    # every decoder linear weight whose input dim is a multiple of 32 is quantized
    assert any(n.endswith("q_proj.weight") for n in q["tensors"])
    assert all(n.split(".")[1] == "layers" or n.split(".")[2] == "layers" for n in q["tensors"])
    ref = dequantized_reference(hf, ckpt)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, hf.config.vocab_size, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                            min_new_tokens=NEW, pad_token_id=0)  # fmt: skip
    largest = max(u.nbytes for u in ckpt.units)
    with zeroinf.load(path, device="cpu", gpu_memory=2 * largest) as model:
        assert all(p.tier != "gpu" for p in model.plan.placements)  # the embed: host or streamed
        got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_quantized_units_are_smaller(tmp_path: Path) -> None:
    save_tiny_hf(tmp_path / "hf", "llama", seed=9, intermediate_size=192)
    full = Checkpoint(convert(tmp_path / "hf", tmp_path / "f", progress=False))
    q4 = Checkpoint(convert(tmp_path / "hf", tmp_path / "q", progress=False,
                            quantize=Quantization(4, 32)))  # fmt: skip
    layer = lambda c: sum(t.nbytes for t in c.manifest.unit("layers.0").tensors)  # noqa: E731
    # float32 weights -> 4 bits + one float16 scale per 32: ~7x fewer bytes
    assert layer(q4) < layer(full) / 6


def test_bad_quantization_block_is_rejected(tmp_path: Path) -> None:
    save_tiny_hf(tmp_path / "hf", "llama", seed=9)
    path = convert(tmp_path / "hf", tmp_path / "zi", progress=False,
                   quantize=Quantization(4, 32))  # fmt: skip
    man = json.loads((path / "manifest.json").read_text())
    man["quantization"]["tensors"].append("model.layers.0.mlp.nonexistent.weight")
    (path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(CheckpointError, match="nonexistent.weight.* has no qweight"):
        Checkpoint(path)


def test_cli_quantize_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_tiny_hf(tmp_path / "hf", "opt", seed=9)
    assert convert_main([str(tmp_path / "hf"), str(tmp_path / "a"), "--quiet", "--quantize",
                         "int8", "--group-size", "32"]) == 0  # fmt: skip
    assert Checkpoint(tmp_path / "a").manifest.quantization["bits"] == 8
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        convert_main([str(tmp_path / "hf"), str(tmp_path / "b"), "--quiet", "--quantize", "int4",
                      "--group-size", "48"])  # fmt: skip
    assert exit_.value.code == 2 and not (tmp_path / "b").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--group-size 48" in err[0]
    with pytest.raises(ConfigError, match="int8 sym"):
        Quantization(8, 64, "asym")


def test_quantized_tied_head(tmp_path: Path) -> None:
    """OPT ties its head to the embedding: --quantize-head quantizes the head's copy only."""
    hf = save_tiny_hf(tmp_path / "hf", "opt", seed=9)
    quant = Quantization(8, group_size=32, head=True)
    path = convert(tmp_path / "hf", tmp_path / "zi", progress=False, quantize=quant)
    ckpt = Checkpoint(path)
    emb = "model.decoder.embed_tokens.weight"
    assert emb in ckpt.manifest.quantization["tensors"]
    assert emb in {t.name for t in ckpt.manifest.unit("embed").tensors}  # float for the gather
    assert f"{emb}.qweight" in {t.name for t in ckpt.manifest.unit("head").tensors}
    # oracle: transformers with the head (only) set to its dequantized copy: untie it
    head = ckpt.manifest.unit("head")
    stored = tensor_views(head, ckpt.read_unit(head, torch.empty(head.nbytes, dtype=torch.uint8)))
    w = dequantize(stored[f"{emb}.qweight"], stored[f"{emb}.scales"])
    hf.lm_head.weight = torch.nn.Parameter(w)
    assert hf.lm_head.weight.data_ptr() != hf.model.decoder.embed_tokens.weight.data_ptr()
    ids = torch.randint(4, hf.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6,
                           pad_token_id=0)  # fmt: skip
    with zeroinf.load(path, device="cpu", gpu_memory=None) as model:
        got = model.generate(ids, max_new_tokens=6)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
