"""One process, one host KV cache: the host tier's decode step as the GPU takes more rows.

    python tools/bench_gpu_rows.py --rows 0,4,8,12,0 -- ZEROINF-BENCH-ARGS
    (e.g. -- --model opt-30b --offload cpu --gpu-memory 24GiB --batch-size auto --kv-tier cpu
     --prompt-len 512 --gen-len 32)

ZEROINF_HOST_GPU_ROWS=g (models/host_attention.py, an experiment) puts the last g rows of each
decode step's attention on the GPU, which reads the pinned host cache over PCIe and so shares
the link with the streamed weights; the CPU kernel keeps the other rows. Separate bench runs
differ by process (the cache's read rate: docs/benchmarks.md), so this plans and loads once
(zeroinf-bench's plan), warms up, then times one generate call per value of --rows in turn on
the same cache. Per call: decode step, the CPU kernel's seconds per step and its GB/s, tok/s;
a table comes last. Needs a CUDA GPU and the native module.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zeroinf.api import Model  # noqa: E402
from zeroinf.cli.bench import bench_plan, parse_args  # noqa: E402
from zeroinf.engine.autoplan import probe_checkpoint  # noqa: E402
from zeroinf.engine.roofline import ModelCost  # noqa: E402
from zeroinf.format import DTYPES  # noqa: E402
from zeroinf.models.host_attention import take_stats  # noqa: E402
from zeroinf.synthetic import SyntheticCheckpoint  # noqa: E402

GB = 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="0,4,8,12,0", help="GPU rows per call, in turn")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then zeroinf-bench's arguments")
    a = ap.parse_args()
    b = parse_args([x for x in a.bench if x != "--"])
    device = torch.device(b.device)  # a CPU run checks this tool only: the GPU rows need CUDA
    ckpt = SyntheticCheckpoint(b.model, DTYPES[b.dtype])
    rates = probe_checkpoint(ckpt, device, False, b.io_backend)
    plan = bench_plan(b, ckpt, device, 1, rates)
    if plan.kv_tier != "cpu":
        raise SystemExit(f"the plan's KV tier is {plan.kv_tier!r}: pass --kv-tier cpu")
    model = Model(ckpt, plan, device, io_backend=b.io_backend, prefill_tokens=b.prefill_tokens)
    print(model.plan, flush=True)
    batch = plan.batch if b.auto else max(b.batch_sizes)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (batch, b.prompt_len), generator=gen)
    cost = ModelCost.from_manifest(ckpt.manifest)
    steps = b.gen_len - 1
    cache = sum(cost.kv_bytes(batch, b.prompt_len + i + 1) for i in range(steps))
    rows = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=b.gen_len)  # warm-up: the cache made, pinned
        for g in (int(x) for x in a.rows.split(",")):
            os.environ["ZEROINF_HOST_GPU_ROWS"] = str(g)
            take_stats()
            model.generate(ids, max_new_tokens=b.gen_len)
            st, h = model.last_stats, take_stats()
            cpu_bytes = cache * (batch - g) / batch
            rate = cpu_bytes / h["kernel_s"] if h["kernel_s"] else float("nan")
            rows.append((g, st.decode_step_s, h["kernel_s"] / steps, rate, st.prefill_s,
                         st.tokens_per_s))  # fmt: skip
            print(f"gpu rows {g}: step {st.decode_step_s:.4f} s, {st.tokens_per_s:.2f} tok/s",
                  flush=True)  # fmt: skip
    model.close()
    per_step = cache / steps / GB
    print(f"\n{b.model}, batch {batch}, one process and cache; streamed per pass "
          f"{plan.streamed_bytes / GB:.2f} GB, cache read per step {per_step:.1f} GB")  # fmt: skip
    print(f"{'gpu rows':>8} {'step s':>8} {'cpu kernel s':>12} {'cpu GB/s':>9} {'prefill s':>9} "
          f"{'tok/s':>7}")  # fmt: skip
    for g, step, kern, rate, pre, tps in rows:
        print(f"{g:>8} {step:8.4f} {kern:12.4f} {rate / GB:9.1f} {pre:9.3f} {tps:7.2f}")


if __name__ == "__main__":
    main()
