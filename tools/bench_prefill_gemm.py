"""Time a decoder layer's prefill matmuls by chunk size, against the probe's matmul rate.

    python tools/bench_prefill_gemm.py [--model opt-30b] [--rows 2048,4096,8192] [--json OUT]

The planner's prefill runs in chunks of `prefill_tokens` rows (default 2048); the roofline and
the cost model count its matmuls at the probe's rate, [8192, hidden] x [hidden, ffn]
(engine/probe.py). This times each matmul of an OPT-style layer (q, k, v, out, fc1, fc2, with
their biases) at each chunk size, three ways for the projections and two for fc1:
  q,k,v     three [M, D] x [D, D] products (the model files' path)
  qkv       one [M, D] x [D, 3D] product (a fused weight)
  fc1+relu  F.linear then F.relu (the model files' path)
  fc1 relu  torch._addmm_activation: the ReLU in cuBLASLt's epilogue
Each figure is a median of CUDA-event timings of 9 calls (after a warm-up); a table comes last:
time per layer for one chunk, its TFLOP/s, and the layer's matmuls at that chunk as a share of
the probe-rate time. Needs a CUDA GPU; ~30 s on the H100.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zeroinf.engine.probe import seconds  # noqa: E402
from zeroinf.synthetic import SHAPES  # noqa: E402

QKV_B = ("q.b", "k.b", "v.b")


def time_chunk(
    m: int, rand: Callable[..., torch.Tensor], w: dict[str, torch.Tensor], probe: float
) -> dict[str, float]:
    """Milliseconds and TFLOP/s of each of the layer's matmuls over m rows."""
    dev = w["q"].device
    f, d = w["fc1"].shape
    x, h, y = rand(m, d), rand(m, d), rand(m, f)
    t = {
        "q,k,v": seconds(lambda: [F.linear(x, w[p], w[p + ".b"]) for p in "qkv"], dev),
        "qkv": seconds(lambda: F.linear(x, w["qkv"], w["qkv.b"]), dev),
        "out": seconds(lambda: F.linear(x, w["out"], w["out.b"]), dev),
        "fc1+relu": seconds(lambda: F.relu(F.linear(x, w["fc1"], w["fc1.b"])), dev),
        "fc1 relu": seconds(lambda: torch._addmm_activation(w["fc1.b"], x, w["fc1"].t()), dev),
        "fc2+res": seconds(lambda: h + F.linear(y, w["fc2"], w["fc2.b"]), dev),
    }
    dd, df = 2 * m * d * d, 2 * m * d * f
    flops = {"q,k,v": 3 * dd, "qkv": 3 * dd, "out": dd, "fc1+relu": df, "fc1 relu": df,
             "fc2+res": df}  # fmt: skip
    layer = t["q,k,v"] + t["out"] + t["fc1+relu"] + t["fc2+res"]
    fused = t["qkv"] + t["out"] + t["fc1 relu"] + t["fc2+res"]
    ideal = (4 * dd + 2 * df) / probe
    return {**{k: v * 1e3 for k, v in t.items()},
            "layer_ms": layer * 1e3, "fused_ms": fused * 1e3, "probe_ms": ideal * 1e3,
            **{f"{k}_tflops": flops[k] / v / 1e12 for k, v in t.items()}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="opt-30b")
    ap.add_argument("--rows", default="1024,2048,4096,8192")
    ap.add_argument("--json")
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.float16
    cfg = SHAPES[a.model]
    d, f = cfg["hidden_size"], cfg["ffn_dim"]
    g = torch.Generator(device=dev).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device=dev, dtype=dt, generator=g) * 0.02).contiguous()

    w = {n: rand(d, d) for n in ("q", "k", "v", "out")} | {"fc1": rand(f, d), "fc2": rand(d, f)}
    w |= {f"{n}.b": rand(t.shape[0]) for n, t in list(w.items())}
    w["qkv"], w["qkv.b"] = torch.cat([w["q"], w["k"], w["v"]]), torch.cat([w[p] for p in QKV_B])
    big = 8192  # the probe's rows
    xp = rand(big, d)
    probe = 2 * big * d * f / seconds(lambda: xp @ w["fc1"].t(), dev)
    rows = [int(r) for r in a.rows.split(",")]
    out: dict[str, dict[str, float]] = {}
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {a.model}: hidden {d}, "
          f"ffn {f} | probe [8192, {d}] x [{d}, {f}]: {probe / 1e12:.0f} TFLOP/s")  # fmt: skip
    for m in rows:
        out[str(m)] = time_chunk(m, rand, w, probe)
    print(f"\n{'rows':>6} " + " ".join(f"{k:>14}" for k in out[str(rows[0])] if "tflops" not in k))
    for m in rows:
        r = out[str(m)]
        cells = [f"{r[k]:7.3f} ({r[k + '_tflops']:3.0f})" if k + "_tflops" in r else f"{r[k]:14.3f}"
                 for k in r if "tflops" not in k]  # fmt: skip
        print(f"{m:>6} " + " ".join(f"{c:>14}" for c in cells))
    print(
        "(ms per call for one chunk of rows, TFLOP/s in brackets; layer: the model's path, "
        "fused: one qkv and the ReLU in the epilogue; probe: the same FLOPs at the probe's rate)"
    )
    for m in rows:
        r = out[str(m)]
        print(
            f"  {m} rows: the model's path at {r['probe_ms'] / r['layer_ms']:.3f} of the probe "
            f"rate, fused {r['probe_ms'] / r['fused_ms']:.3f}"
        )
    if a.json:
        Path(a.json).write_text(json.dumps({"probe_tflops": probe / 1e12, "rows": out}, indent=1))


if __name__ == "__main__":
    main()
