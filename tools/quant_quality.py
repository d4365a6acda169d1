"""bf16 vs int4/int8 weights on the same random-weight model: relative logit error of the
prefill's last position and greedy-token agreement over 64 new tokens.

    python tools/quant_quality.py [--device cpu|cuda] [--hidden 512] [--layers 4]

Random weights say nothing about a trained model's quality: this measures how far the quantized
arithmetic moves the outputs of one model, nothing more.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zeroinf  # noqa: E402
from zeroinf.convert import Quantization, convert  # noqa: E402
from zeroinf.engine.executor import MicroBatch  # noqa: E402
from zeroinf.models.base import build_context  # noqa: E402
from zeroinf.tiny import save_tiny_hf  # noqa: E402


def last_logits(model: zeroinf.Model, ids: torch.Tensor) -> torch.Tensor:
    """Float32 logits of the last prompt position, through the streaming executor."""
    dev = model.device
    kv = model._new_kv(ids.shape[0], ids.shape[1])
    ctx = build_context(torch.ones_like(ids, device=dev), 0, ids.shape[1])
    (out,) = model.executor.forward([MicroBatch(ids.to(dev), ctx, kv)])
    return out.float().cpu()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--new", type=int, default=64)
    a = p.parse_args()
    d = Path(tempfile.mkdtemp())
    save_tiny_hf(d / "hf", "llama", tokenizer=False, dtype=torch.bfloat16, hidden_size=a.hidden,
                 intermediate_size=a.hidden * 3, num_hidden_layers=a.layers,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=2048,
                 max_position_embeddings=512)  # fmt: skip
    variants = {"bf16": None, "int8": Quantization(8, 64), "int4 sym": Quantization(4, 64),
                "int4 asym": Quantization(4, 64, "asym")}  # fmt: skip
    ids = torch.randint(4, 2048, (8, 32), generator=torch.Generator().manual_seed(0))
    outs, logits = {}, {}
    for name, q in variants.items():
        path = convert(d / "hf", d / name.replace(" ", "-"), progress=False, quantize=q)
        with torch.inference_mode(), zeroinf.load(path, device=a.device, gpu_memory=None) as m:
            logits[name] = last_logits(m, ids)
            outs[name] = m.generate(ids, max_new_tokens=a.new)[:, ids.shape[1] :].cpu()
    ref_l, ref_t = logits["bf16"], outs["bf16"]
    print(f"llama, hidden {a.hidden}, {a.layers} layers, random bf16 weights, batch 8, "
          f"prompt 32, {a.new} greedy tokens, device {a.device}")  # fmt: skip
    print(f"{'weights':>10} {'rel logit err':>14} {'top-1 same':>11} {'tokens equal':>13} "
          f"{'equal before 1st diff':>22}")  # fmt: skip
    for name in variants:
        err = ((logits[name] - ref_l).norm() / ref_l.norm()).item()
        top1 = (logits[name].argmax(-1) == ref_l.argmax(-1)).float().mean().item()
        same = (outs[name] == ref_t).float().mean().item()
        diff = (outs[name] != ref_t).int()
        first = torch.where(diff.any(-1), diff.argmax(-1), torch.full_like(diff[:, 0], a.new))
        print(f"{name:>10} {err:>14.2e} {top1:>11.2f} {same:>13.2f} {first.float().mean():>22.1f}")


if __name__ == "__main__":
    main()
