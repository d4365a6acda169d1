"""Does the host KV cache's layout, or its size, change how fast the kernel reads it beside H2D?

Inside p30 runs the kernel reads the 72 GB cache 6-15% slower than the probe's 6 GB beside H2D
(docs/benchmarks.md: "the cache's size slows its reads"). Over OPT-30B's decode layer (batch
96, 56 heads, 544 positions, fp16), zero-filled on huge pages as new_kv_cache makes it:
  layout    "separate": k and v tensors [B, H, S, D] each (kvcache's layout: two streams of
            reads per (row, head) task); "interleaved": one [B, H, S, 2, D] buffer, a
            position's key beside its value (one stream per task; the kernel takes the
            strides as they are),
  footprint 4 layers (6 GB, as the probe reads) and --layers (default 32: 48 GB, each layout
            allocated once, the variants alternating twice),
  H2D       the probe's one 256 MiB pinned buffer copied again and again, or 16 of them in
            turn (4 GiB, 13 x the 300 MiB L3, as a run's streamed weights),
and torch's sum (the host memory probe's reader) over the same memory beside either source.

    python tools/bench_host_layout.py [--layers 32] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zeroinf.engine.probe import concurrent_with_h2d  # noqa: E402
from zeroinf.io.memory import aligned_empty  # noqa: E402
from zeroinf.models import host_attention as ha  # noqa: E402
from zeroinf.models.base import LayerKV  # noqa: E402

GB = 1e9
B, H, T, D = 96, 56, 544, 128  # OPT-30B's decode layer at batch 96, 512 + 32 positions


def layer_cache(layout: str) -> LayerKV:
    """One layer's zeroed fp16 host cache in `layout` (huge pages, faulted in by the zeroing)."""
    n = B * H * T * D * 2  # one of k, v in bytes
    if layout == "separate":
        k, v = (aligned_empty(n).view(torch.float16).view(B, H, T, D).zero_() for _ in "kv")
    else:
        both = aligned_empty(2 * n).view(torch.float16).view(B, H, T, 2, D).zero_()
        k, v = both[:, :, :, 0], both[:, :, :, 1]
    return LayerKV(k, v, None, None, True)


def measure(run: Callable[[], None], nbytes: int, cuda: torch.device) -> dict[str, float]:
    """GB/s of `run` (reading `nbytes`) alone, and beside H2D from 1 and from 16 buffers (with
    the copies' GB/s)."""
    time.sleep(0.1)  # torch's OpenMP threads quiet
    run()
    t0 = time.perf_counter()
    for _ in range(3):
        run()
    res = {"alone": 3 * nbytes / (time.perf_counter() - t0) / GB}
    for pieces in (1, 16):
        copied, calls = concurrent_with_h2d(run, cuda, 2.0, pieces=pieces)
        res[f"beside_{pieces}"] = calls * nbytes / GB
        res[f"h2d_{pieces}"] = copied / GB
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    cuda = torch.device("cuda")
    q = torch.randn(B, H, 1, D).to(torch.float16)
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    out = torch.empty(B, 1, H * D, dtype=torch.float16)
    layouts = ("separate", "interleaved")
    caches = {lay: [layer_cache(lay) for _ in range(a.layers)] for lay in layouts}
    per_layer = 2 * B * H * T * D * 2

    def attend(kvs: list[LayerKV]) -> Callable[[], None]:
        def run() -> None:
            for kv in kvs:
                assert ha.native_decode(q, kv, T, mask, D**-0.5, out)

        return run

    def total(kvs: list[LayerKV]) -> Callable[[], None]:
        flat = [x.view(torch.int64).view(-1) for kv in kvs for x in _buffers(kv)]

        def run() -> None:
            for x in flat:
                x.sum()

        return run

    rows = []
    for n in (4, a.layers):
        for rep in range(1 if n == 4 else 2):
            for layout in ("separate", "interleaved"):
                kvs = caches[layout][:n]
                for reader, run in (("kernel", attend(kvs)), ("torch sum", total(kvs))):
                    if reader == "torch sum" and (rep or layout == "interleaved"):
                        continue  # the same bytes in another order: once is enough
                    r = {"layout": layout, "layers": n, "reader": reader,
                         **measure(run, n * per_layer, cuda)}  # fmt: skip
                    rows.append(r)
                    print(r, flush=True)
    print(
        "\n| reader | layout | cache GB | alone | beside H2D (1 buffer) + H2D | total "
        "| beside H2D (16 buffers) + H2D | total |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['reader']} | {r['layout']} | {r['layers'] * per_layer / GB:.0f} | "
              f"{r['alone']:.1f} | {r['beside_1']:.1f} + {r['h2d_1']:.1f} | "
              f"{r['beside_1'] + r['h2d_1']:.1f} | {r['beside_16']:.1f} + {r['h2d_16']:.1f} | "
              f"{r['beside_16'] + r['h2d_16']:.1f} |")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


def _buffers(kv: LayerKV) -> list[torch.Tensor]:
    """The host memory under a layer's k and v, whole (an interleaved layout's one buffer)."""
    if kv.k.is_contiguous():
        return [kv.k, kv.v]
    return [kv.k.as_strided((kv.k.numel() * 2,), (1,))]


if __name__ == "__main__":
    main()
