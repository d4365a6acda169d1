"""The host KV tier's decode in one micro-batch against two that overlap on two CUDA streams
(engine/executor.py _overlap_streams), on one model and one host cache, in one process, turn
and turn about.

Separate zeroinf-bench runs cannot compare them: on the H100 machine the kernel's read rate of
the 72 GB cache moves by up to 25% from process to process (75-94 GB/s on the same code and
plan, 2026-11-24: where the cache lands in memory), several times the overlap's effect. Here the
cache is allocated once and kept: only the decode's micro-batches change between calls.

    python tools/bench_overlap.py [--rounds 2] [--json F] [zeroinf-bench flags]

Prints per call: the micro-batch rows, prefill s, decode step s, the kernel's s per step and
the step's time outside it; then each variant's mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from zeroinf.api import Model
from zeroinf.cli.bench import bench_plan, parse_args
from zeroinf.engine.autoplan import probe_checkpoint
from zeroinf.format import DTYPES
from zeroinf.models.host_attention import take_stats
from zeroinf.synthetic import SyntheticCheckpoint

DEFAULT = ["--model", "opt-30b", "--offload", "cpu", "--gpu-memory", "24GiB", "--batch-size",
           "96", "--kv-tier", "cpu", "--prompt-len", "512", "--gen-len", "32"]  # fmt: skip


def one_call(model: Model, ids: torch.Tensor, rows: int, gen: int) -> dict[str, float]:
    """A generate with decode micro-batches of `rows`, on the cache the model keeps."""
    decode = model._decode
    if decode.shape is not None:  # same cache; micro-batches rebuilt for the new rows
        decode.shape, decode.static = (decode.shape[0], decode.shape[1], rows), None
    model.micro_batch = rows
    take_stats()
    model.generate(ids, max_new_tokens=gen)
    st, h = model.last_stats, take_stats()
    step = st.decode_s / (gen - 1)
    kernel = h["kernel_s"] / (gen - 1)
    return {"rows": rows, "prefill_s": st.prefill_s, "step_s": step, "kernel_s": kernel,
            "outside_s": step - kernel, "tok_s": st.tokens_per_s}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    mine, rest = ap.parse_known_args(argv)
    a = parse_args(DEFAULT + rest)
    device = torch.device(a.device)
    ckpt = SyntheticCheckpoint(a.model, DTYPES[a.dtype])
    rates = probe_checkpoint(ckpt, device, False, a.io_backend, refresh=True)
    plan = bench_plan(a, ckpt, device, 1, rates)
    batch = max(a.batch_sizes)
    model = Model(ckpt, plan, device, prefill_tokens=a.prefill_tokens, kv_dtype=a.kv_dtype)
    print(model.plan, flush=True)
    ids = torch.randint(4, model.config.vocab_size, (batch, a.prompt_len),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    one_call(model, ids, batch, a.gen_len)  # warm-up: the cache allocated, kernels compiled
    calls = []
    for r in range(mine.rounds):  # A B, then B A: neither always runs second
        order = (batch, batch // 2) if r % 2 == 0 else (batch // 2, batch)
        for rows in order:
            calls.append(one_call(model, ids, rows, a.gen_len))
            print(" ".join(f"{k} {v:.4g}" for k, v in calls[-1].items()), flush=True)
    model.close()
    print("\n| decode rows per micro-batch | calls | prefill s | step s | kernel s | outside s "
          "| tok/s |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for rows in (batch, batch // 2):
        mine_ = [c for c in calls if c["rows"] == rows]
        mean = {k: statistics.mean(c[k] for c in mine_) for k in mine_[0]}
        print(
            f"| {rows} | {len(mine_)} | {mean['prefill_s']:.3f} | {mean['step_s']:.4f} | "
            f"{mean['kernel_s']:.4f} | {mean['outside_s']:.4f} | {mean['tok_s']:.2f} |"
        )
    if mine.json:
        mine.json.write_text(json.dumps(calls, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
