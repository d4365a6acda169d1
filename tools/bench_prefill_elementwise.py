"""The prefill's elementwise work, and cheaper forms of it, on one chunk of rows.

The prefill's profile (docs/benchmarks.md: stage profhp for OPT-30B, profb96 for OPT-13B) has
~0.25 s (OPT-13B, batch 96 x 512) to ~0.45 s (OPT-30B) of elementwise kernels per prefill
beside the matmuls: the keys' and values' transposing copy into the cache (or the packed
source of the host tier's DMA), which torch runs 2 bytes at a time; the ReLU after fc1; the
residual adds and the LayerNorms. Each is timed here against a cheaper form, which must give
the same bytes (or, for the fused norm, within one rounding):
  kv copy        [B, S, H, D] -> [B, H, S, D] (the projection's view -> packed), fp16 against
                 layers.copy_wide (the same bytes viewed as int64: 8 bytes an element)
  kv into cache  the same into a cache slice [B, H, 0:S of T, D]
  fc1 relu       F.relu(F.linear(x, w, b)) against layers.linear_act (torch._addmm_activation:
                 cuBLASLt's epilogue)
  add + norm     h + a, then F.layer_norm(h), against kernels.layer_norm(a, residual=h)
Per chunk of `--rows` rows (median of CUDA-event timings) and per prefill (x layers x chunks
x uses per layer). Needs a CUDA GPU; ~20 s.

    python tools/bench_prefill_elementwise.py [--rows 2048] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from zeroinf.engine.probe import seconds  # noqa: E402
from zeroinf.models.layers import _wide_copy_ok, copy_wide, linear_act  # noqa: E402
from zeroinf.synthetic import SHAPES  # noqa: E402

PROMPT, BATCH = 512, 96  # the issue-7 runs' prefill: 96 x 512 tokens


def copied(dst: torch.Tensor, src: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    dst.copy_(src)
    return result


def copied_wide(dst: torch.Tensor, src: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    assert _wide_copy_ok(dst, src)  # the form timed here is the int64 one
    copy_wide(dst, src)
    return result


def cases(m: int, model: str, dev: torch.device) -> dict[str, tuple[Callable[[], Any], ...]]:
    """name -> (torch form, cheaper form, uses per layer); both forms return their result."""
    cfg = SHAPES[model]
    d, f, h = cfg["hidden_size"], cfg["ffn_dim"], cfg["num_attention_heads"]
    dh, b = d // h, max(1, m // PROMPT)
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=torch.float16, generator=g)

    kv = rand(b, PROMPT, d).view(b, PROMPT, h, dh).transpose(1, 2)  # the projection's view
    packed = torch.empty(b, h, PROMPT, dh, device=dev, dtype=torch.float16)
    cache = torch.empty(b, h, PROMPT + 32, dh, device=dev, dtype=torch.float16)
    x, w1, b1 = rand(m, d) * 0.1, rand(f, d) * 0.02, rand(f) * 0.02
    a, res, lw, lb = rand(m, d), rand(m, d), rand(d), rand(d)
    return {
        "kv copy": (lambda: copied(packed, kv, packed),
                    lambda: copied_wide(packed, kv, packed), 2),
        "kv into cache": (lambda: copied(cache[:, :, :PROMPT], kv, cache),
                          lambda: copied_wide(cache[:, :, :PROMPT], kv, cache), 2),
        "fc1 relu": (lambda: F.relu(F.linear(x, w1, b1)),
                     lambda: linear_act(x, w1, b1, "relu"), 1),
        "add + norm": (lambda: F.layer_norm(res + a, (d,), lw, lb, 1e-5),
                       lambda: kernels.layer_norm(a, lw, lb, 1e-5, residual=res)[0], 2),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--models", default="opt-13b,opt-30b")
    ap.add_argument("--json")
    a = ap.parse_args()
    dev = torch.device("cuda", 0)
    out: dict[str, dict[str, dict[str, float]]] = {}
    lines = []
    for model in a.models.split(","):
        layers = SHAPES[model]["num_hidden_layers"]
        chunks = BATCH * PROMPT // a.rows
        out[model] = {}
        for name, (ref, new, uses) in cases(a.rows, model, dev).items():
            t_ref, t_new = seconds(ref, dev, repeat=15), seconds(new, dev, repeat=15)
            diff = (ref().float() - new().float()).abs().max().item()
            per = layers * chunks * uses
            saved = (t_ref - t_new) * per
            out[model][name] = {"torch_ms": t_ref * 1e3, "new_ms": t_new * 1e3,
                                "prefill_saved_s": saved, "max_diff": diff}  # fmt: skip
            lines.append(f"{model:<8} {name:<14} {t_ref * 1e3:>8.3f} {t_new * 1e3:>8.3f} "
                         f"{t_ref * per:>8.3f} {t_new * per:>8.3f} {diff:>9.2e}")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"rows per chunk {a.rows}; per prefill of {BATCH} x {PROMPT} tokens")
    print(f"{'model':<8} {'case':<14} {'torch ms':>8} {'new ms':>8} {'torch s':>8} {'new s':>8} "
          f"{'max diff':>9}")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
