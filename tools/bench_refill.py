"""Continuous refill against static batches on one job (issue #9): N prompts whose output
lengths are mixed (uniform in --min-new..--max-new, no EOS, so every request generates exactly
its own count), throughput of both ways of batching them, each beside its roofline.

    python tools/bench_refill.py                      # OPT-13B shape, 12 GiB budget, H100
    python tools/bench_refill.py --model tiny-llama --device cpu --prompts 24 --batch-size 4 \\
        --max-new 16                                  # the CPU smoke run (tests/tools)

The random-weight model is built in its tier by zeroinf-bench's own run() (the shape, the
plan, the rates measured in the same run); only its per-batch measurement is swapped for the
comparison here.

- static: the requests in order, in batches of --batch-size, each batch one Model.generate call
  to the longest max_new_tokens in it (prompts left padded). Only each request's own tokens are
  useful: a row that needed 8 tokens rides through the batch's ~250 passes anyway.
- refill: Model.generate_stream with --batch-size rows in flight; a finished row's place goes
  to the next request, whose prefill shares the weight pass with the others' decode.

Both report useful tokens, wall seconds, useful tok/s, forward passes and the roofline: every
pass streams the plan's streamed bytes at the H2D rate measured in this run (min(disk, H2D) on
NVMe), so the floor is passes x streamed bytes / rate. Offloaded decode is transfer-bound, so
the pass count is what refill changes: rows per pass (tokens/pass) stay near --batch-size.

Prompts are 16..64 random ids: mixed, so static batches pad (as a real job's would), and short
next to the outputs, because the comparison is about output lengths and because short prompts
keep the KV cache small enough for a batch large enough to amortize each weight stream (the
regime offloaded inference runs in; the KV arithmetic is at DEFAULT_BATCH below).

Device time with the defaults on an H100 (OPT-13B fp16 with 12 GiB on the GPU streams ~15.5 GB
per pass at ~54 GB/s: ~0.29 s per pass), 512 requests, batch 192, 8..256 new tokens:
- static: ceil(512 / 192) = 3 batches, each to its longest request (the longest of 192 uniform
  draws is ~255): 766 passes for the default draw (seed 0), ~220 s;
- refill: 68,264 useful tokens at up to 192 rows per pass is >= 356 passes, plus the drain once
  no request waits (the last rows run out with fewer and fewer rows); counting the passes of
  the same draw gives 492, ~141 s (0.64 x static's passes: ~1.56 x the useful tok/s);
- plus ~30 s to build the shape (pinning ~15.5 GB), measure the machine and warm up: ~6.5
  minutes in all. (--prompts 384 makes static 2 batches: 511 + 429 passes, ~5 minutes.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from zeroinf.cli import bench  # noqa: E402
from zeroinf.engine.refill import Request  # noqa: E402
from zeroinf.errors import ZeroInfError  # noqa: E402

GB = 1e9
# KV cache on an 80 GB H100 beside the 12 GiB (12.9 GB) budget, OPT-13B in fp16: one token of
# one row holds K and V of 40 layers x 5120 wide x 2 bytes = 819,200 bytes. Static batches hold
# prompt + new tokens per row (at most 64 + 256 = 320): 192 rows x 320 x 0.82 MB = 50.3 GB.
# Refill holds CACHE_SLACK more per row (below): 192 x 384 x 0.82 MB = 60.4 GB at most, so
# 12.9 + 60.4 = 73.3 GB of the H100's 85 GB, the rest for the CUDA context and the compaction's
# copy of one layer (0.75 GB). 256 rows would need 80.5 GB of refill cache; 192 keeps static at 3
# batches (171..255 rows all do).
DEFAULT_BATCH = 192
# Refill's cache length beyond the longest request: its rows share one write index, and when it
# reaches the end every row's live window moves left (one copy of the cache, ~0.1 s for 60 GB
# of HBM traffic x 4). Each move frees more than CACHE_SLACK indices, so moves come at most every
# 64 passes, <1% of the run, where the default (twice the longest) would not fit 192 rows.
CACHE_SLACK = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench_refill",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="opt-13b", help="a shape name (zeroinf.synthetic.SHAPES)")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--offload", choices=("cpu", "nvme"), default="cpu")
    p.add_argument("--nvme-dir", help="with --offload nvme: where the shape's unit files go")
    p.add_argument("--gpu-memory", default="12GiB", help="device budget for weights")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                   help=f"rows per static batch and rows in flight for refill (default "
                   f"{DEFAULT_BATCH}: the KV cache of both fits an 80 GB GPU)")  # fmt: skip
    p.add_argument("--prompts", type=int, default=512, help="requests in the job (default 512)")
    p.add_argument("--min-prompt", type=int, default=16, help="prompt ids, fewest (default 16)")
    p.add_argument("--max-prompt", type=int, default=64, help="prompt ids, most (default 64)")
    p.add_argument("--min-new", type=int, default=8, help="new tokens, fewest (default 8)")
    p.add_argument("--max-new", type=int, default=256, help="new tokens, most (default 256)")
    p.add_argument("--seed", type=int, default=0, help="the requests' draw (default 0)")
    p.add_argument("--mode", choices=("both", "static", "refill"), default="both")
    p.add_argument("--json", help="write every figure to this file (after each mode)")
    a = p.parse_args(argv)
    if min(a.batch_size, a.prompts, a.min_prompt, a.min_new) < 1:
        p.error("--batch-size, --prompts, --min-prompt and --min-new must be >= 1")
    if a.min_prompt > a.max_prompt or a.min_new > a.max_new:
        p.error("--min-prompt/--min-new must not exceed --max-prompt/--max-new")
    return a


def bench_args(a: argparse.Namespace) -> argparse.Namespace:
    """zeroinf-bench's arguments for the same shape, tier and budget (its defaults otherwise)."""
    argv = ["--model", a.model, "--device", a.device, "--offload", a.offload,
            "--gpu-memory", a.gpu_memory, "--dtype", a.dtype, "--batch-size", str(a.batch_size),
            "--prompt-len", str(a.max_prompt), "--gen-len", str(a.max_new)]  # fmt: skip
    if a.nvme_dir:
        argv += ["--nvme-dir", a.nvme_dir]
    return bench.parse_args(argv)


def make_requests(a: argparse.Namespace, vocab: int) -> list[Request]:
    """--prompts requests from a fixed seed: random ids (never the first 4, where special
    tokens sit), lengths and new-token counts uniform in their ranges."""
    g = torch.Generator().manual_seed(a.seed)

    def uniform(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    reqs = []
    for i in range(a.prompts):
        ids = torch.randint(4, vocab, (uniform(a.min_prompt, a.max_prompt),), generator=g)
        reqs.append(Request(ids.tolist(), uniform(a.min_new, a.max_new), key=i))
    return reqs


@contextmanager
def counted_passes(model: Any) -> Iterator[dict[str, int]]:
    """Counts the executor's forward passes while the block runs (one call = one weight pass)."""
    counts = {"passes": 0}
    forward = model.executor.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        counts["passes"] += 1
        return forward(*args, **kwargs)

    model.executor.forward = counted
    try:
        yield counts
    finally:
        model.executor.forward = forward


def timed(model: Any, fn: Callable[[], int]) -> tuple[int, int, float]:
    """(useful tokens fn returns, passes, wall seconds), the device synchronized at both ends."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda *_: None)
    with counted_passes(model) as counts:
        sync(model.device)
        t = time.perf_counter()
        useful = fn()
        sync(model.device)
        wall = time.perf_counter() - t
    return useful, counts["passes"], wall


def left_padded(reqs: list[Request]) -> tuple[torch.Tensor, torch.Tensor]:
    """A static batch: ids and attention mask [B, longest prompt], prompts right-aligned (the
    pad id is irrelevant: masked)."""
    width = max(len(r.ids) for r in reqs)
    ids = torch.zeros(len(reqs), width, dtype=torch.long)
    mask = torch.zeros(len(reqs), width, dtype=torch.long)
    for i, r in enumerate(reqs):
        ids[i, width - len(r.ids) :] = torch.tensor(r.ids)
        mask[i, width - len(r.ids) :] = 1
    return ids, mask


def run_static(model: Any, reqs: list[Request], batch: int) -> tuple[int, int, float]:
    batches = [reqs[i : i + batch] for i in range(0, len(reqs), batch)]
    ids, mask = left_padded(batches[0])
    model.generate(ids, attention_mask=mask, max_new_tokens=2)  # warm-up: kernels, allocator

    def job() -> int:
        useful = 0
        for group in batches:
            ids, mask = left_padded(group)
            new = max(r.max_new_tokens for r in group)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new)
            assert out.shape[1] == ids.shape[1] + new  # no EOS: every row ran to the end
            useful += sum(r.max_new_tokens for r in group)  # each row's own tokens only
        return useful

    return timed(model, job)


def run_refill(model: Any, reqs: list[Request], batch: int, cache: int) -> tuple[int, int, float]:
    warm = [Request(r.ids, 2, key=r.key) for r in reqs[: min(batch, 8)]]
    for _ in model.generate_stream(warm, batch_size=batch, cache_tokens=cache):
        pass  # warm-up: the many-micro-batch pass, the sampling per row

    def job() -> int:
        useful = 0
        for req, toks in model.generate_stream(reqs, batch_size=batch, cache_tokens=cache):
            assert len(toks) == req.max_new_tokens  # no EOS
            useful += len(toks)
        return useful

    return timed(model, job)


def figures(useful: int, passes: int, wall: float, rows: int, floor_pass_s: float) -> dict:
    roof = passes * floor_pass_s
    return {
        "useful_tokens": useful, "wall_s": wall, "useful_tok_per_s": useful / wall,
        "passes": passes, "tokens_per_pass": useful / max(1, passes),
        "row_occupancy": useful / max(1, passes * rows),
        "roofline_s": roof, "roofline_tok_per_s": useful / roof if roof else None,
        "ratio_to_roofline": roof / wall if roof else None,
    }  # fmt: skip


def compare(a: argparse.Namespace, write: Callable[[dict], None]) -> Callable[..., dict]:
    """zeroinf-bench's per-batch measure(a, model, ckpt, rates, ...) replaced by both modes."""

    def measure(_ba: argparse.Namespace, model: Any, ckpt: Any, rates: Any, *_: Any) -> dict:
        device, plan = model.device, model.plan
        reqs = make_requests(a, model.config.vocab_size)
        longest = max(len(r.ids) + r.max_new_tokens for r in reqs)
        cache = min(model.config.max_positions, longest + CACHE_SLACK)
        res: dict[str, Any] = {
            "model": a.model, "dtype": a.dtype, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"), "offload": a.offload,
            "gpu_budget": plan.gpu_budget, "resident_bytes": plan.resident_bytes,
            "streamed_bytes_per_pass": plan.rank_streamed_bytes, "batch": a.batch_size,
            "prompts": a.prompts, "prompt_len": [a.min_prompt, a.max_prompt],
            "new_tokens": [a.min_new, a.max_new], "seed": a.seed,
            "requested_tokens": sum(r.max_new_tokens for r in reqs),
            "refill_cache_tokens": cache,
            "kv_bytes": {"static": model.kv_bytes(a.batch_size, a.max_prompt + a.max_new),
                         "refill": model.kv_bytes(a.batch_size, cache)},
            "measured": {k: v for k, v in dataclasses.asdict(rates).items()
                         if k != "device_name"},
        }  # fmt: skip
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for mode in ("static", "refill") if a.mode == "both" else (a.mode,):
            if mode == "static":
                useful, passes, wall = run_static(model, reqs, a.batch_size)
            else:
                useful, passes, wall = run_refill(model, reqs, a.batch_size, cache)
            if device.type == "cuda":  # the next mode's cache gets all that this one freed
                res[f"{mode}_max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            res[mode] = {"useful_tokens": useful, "passes": passes, "wall_s": wall}
            finish(res, rates, a.offload, device)
            write(res)  # after each mode: a run cut short still leaves the finished figures
        return res

    return measure


def finish(res: dict, rates: Any, offload: str, device: torch.device) -> None:
    """The roofline of every mode measured so far, from the rates of this run (H2D measured
    again on a GPU, the faster count kept: a shared host's link is noisy, as zeroinf-bench
    does), and the refill / static ratios."""
    if device.type == "cuda":
        from zeroinf.engine.probe import measure_h2d

        again = measure_h2d(device, nbytes=512 << 20)
        res["measured"]["h2d_bytes_per_s_after"] = again
        rates = dataclasses.replace(rates, h2d_bytes_per_s=max(rates.h2d_bytes_per_s, again))
    rate = rates.stream_bytes_per_s(offload)
    res["stream_bytes_per_s"] = rate
    floor_pass_s = res["streamed_bytes_per_pass"] / rate
    res["roofline_pass_s"] = floor_pass_s
    for mode in ("static", "refill"):
        if mode in res:
            r = res[mode]
            r.update(figures(r["useful_tokens"], r["passes"], r["wall_s"], res["batch"],
                             floor_pass_s))  # fmt: skip
    if "static" in res and "refill" in res:
        s, r = res["static"], res["refill"]
        res["refill_vs_static"] = {
            "useful_tok_per_s": r["useful_tok_per_s"] / s["useful_tok_per_s"],
            "passes": r["passes"] / s["passes"], "wall_s": r["wall_s"] / s["wall_s"],
        }  # fmt: skip


def print_table(res: dict) -> None:
    print(
        f"\n{res['model']} {res['dtype']} on {res['device_name']} ({res['date']}), offload "
        f"{res['offload']}, budget {res['gpu_budget'] / GB:.2f} GB, streamed "
        f"{res['streamed_bytes_per_pass'] / GB:.2f} GB per pass at "
        f"{res['stream_bytes_per_s'] / GB:.1f} GB/s ({res['roofline_pass_s']:.3f} s floor)"
    )
    print(
        f"  {res['prompts']} requests, prompts {res['prompt_len'][0]}..{res['prompt_len'][1]} "
        f"ids, {res['new_tokens'][0]}..{res['new_tokens'][1]} new tokens (no EOS), batch "
        f"{res['batch']}; KV static {res['kv_bytes']['static'] / GB:.1f} GB, refill "
        f"{res['kv_bytes']['refill'] / GB:.1f} GB"
    )
    head = ("mode", "useful tok", "wall s", "tok/s", "passes", "tok/pass", "roof tok/s", "ratio")
    print("  " + f"{head[0]:8}" + "".join(f"{h:>11}" for h in head[1:]))
    for mode in ("static", "refill"):
        if mode in res:
            r = res[mode]
            cells = (r["useful_tokens"], r["wall_s"], r["useful_tok_per_s"], r["passes"],
                     r["tokens_per_pass"], r["roofline_tok_per_s"],
                     r["ratio_to_roofline"])  # fmt: skip
            print(f"  {mode:8}" + "".join("-".rjust(11) if c is None else f"{c:>11.4g}"
                                          for c in cells))  # fmt: skip
    if "refill_vs_static" in res:
        x = res["refill_vs_static"]
        print(f"  refill / static: useful tok/s x{x['useful_tok_per_s']:.3f}, passes "
              f"x{x['passes']:.3f}, wall x{x['wall_s']:.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    def write(res: dict) -> None:
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))

    try:
        with torch.inference_mode(), mock.patch.object(bench, "measure", compare(a, write)):
            (res,) = bench.run(bench_args(a))
    except ZeroInfError as e:
        print(f"bench_refill: error: {e}", file=sys.stderr)
        return 2
    print_table(res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
