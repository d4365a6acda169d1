"""zeroinf-bench: generation throughput of a named shape (random weights built in their tier)
or a converted checkpoint, next to the roofline measured on this machine in the same run."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import torch

from zeroinf.errors import ConfigError, ZeroInfError
from zeroinf.sizes import parse_bytes

if TYPE_CHECKING:
    from zeroinf.engine.costmodel import Prediction
    from zeroinf.engine.plan import Plan
    from zeroinf.engine.probe import Rates
    from zeroinf.format import Checkpoint

GB = 1e9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from zeroinf.synthetic import SHAPES

    p = argparse.ArgumentParser(prog="zeroinf-bench", description=__doc__)
    p.add_argument("--model", default="tiny-llama", help=f"a shape ({', '.join(SHAPES)})")
    p.add_argument("--path", help="a converted checkpoint or HF folder instead of a shape")
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    p.add_argument("--offload", choices=("cpu", "nvme"), default="cpu")
    p.add_argument("--gpu-memory", default="12GiB",
                   help="device budget for weights, slots and activations; with --batch-size "
                   "auto the whole budget, KV cache included")  # fmt: skip
    p.add_argument("--nvme-dir", help="where --offload nvme writes the shape's unit files")
    p.add_argument("--batch-size", default="32",
                   help="one size, several (8,16,32: a sweep), or 'auto': the planner's choice "
                   "for the whole --gpu-memory budget")  # fmt: skip
    p.add_argument(
        "--micro-batch",
        type=int,
        help="with a given batch: decode in micro-batches of this many rows",
    )
    p.add_argument("--plan-only", action="store_true",
                   help="print the plan and its predicted prefill, decode step and tok/s; "
                   "generate nothing")  # fmt: skip
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--prefill-tokens", type=int, default=2048, help="tokens per prefill chunk")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--io-backend", help="reader backend (default: automatic)")
    p.add_argument("--json", help="write every figure to this file")
    p.add_argument("--trace", action="store_true", help="time every copy (CUDA events)")
    p.add_argument("--quantize", choices=("int4", "int8"), help="a shape's weights quantized")
    p.add_argument("--group-size", type=int, default=64, help="with --quantize")
    p.add_argument("--quantize-head", action="store_true", help="with --quantize: the LM head too")
    p.add_argument("--kv-dtype", choices=("int8",), help="KV cache stored as int8 (lossy)")
    p.add_argument("--kv-tier", choices=("gpu", "cpu", "split"),
                   help="where the KV cache lives: gpu, cpu (host memory, attention on the "
                   "CPU), or split (the planner's layers on each, with --batch-size auto); "
                   "default: the planner's with --batch-size auto, else gpu")  # fmt: skip
    p.add_argument("--repeat", type=int, default=1,
                   help="timed calls of each batch, one after another on the same cache: the "
                   "first is the reported figure, the later ones are listed beside it")  # fmt: skip
    p.add_argument("--plot", help="draw tok/s and the roofline against batch size into this PNG")
    a = p.parse_args(argv)
    a.auto = a.batch_size == "auto"
    if a.repeat < 1:
        p.error(f"--repeat {a.repeat}: at least 1")
    try:
        a.batch_sizes = [] if a.auto else [int(b) for b in str(a.batch_size).split(",")]
    except ValueError:
        p.error(f"--batch-size {a.batch_size!r}: 'auto', or integers, comma-separated")
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib (pip install 'zeroinf[plot]')")
    if a.path is None and a.model not in SHAPES:
        p.error(f"--model {a.model!r}: unknown shape; choose from {', '.join(SHAPES)}")
    if min(*a.batch_sizes, a.prompt_len, a.gen_len, a.prefetch) < 1:
        p.error("--batch-size, --prompt-len, --gen-len and --prefetch must be >= 1")
    return a


def write_shape(shape: str, dtype: torch.dtype, folder: str) -> str:
    """Unit files of a random shape, for the NVMe tier (reused when present)."""
    import dataclasses
    import zlib

    from zeroinf.format import Checkpoint, write_manifest
    from zeroinf.synthetic import SyntheticCheckpoint

    dst = os.path.join(folder, f"{shape}-{str(dtype)[6:]}")
    if os.path.isfile(os.path.join(dst, "manifest.json")):
        return dst
    syn = SyntheticCheckpoint(shape, dtype)
    os.makedirs(dst + ".partial", exist_ok=True)
    buf = torch.empty(max(u.nbytes for u in syn.units), dtype=torch.uint8)
    units = []
    for u in syn.units:
        data = syn.read_unit(u, buf[: u.nbytes]).numpy()
        with open(os.path.join(dst + ".partial", u.file), "wb") as f:
            f.write(data)
        units.append(dataclasses.replace(u, crc32=zlib.crc32(data)))  # from the written bytes
    write_manifest(dst + ".partial", dataclasses.replace(syn.manifest, units=tuple(units)))
    os.replace(dst + ".partial", dst)
    Checkpoint(dst)
    return dst


def run(a: argparse.Namespace) -> list[dict[str, Any]]:
    import zeroinf
    from zeroinf.api import Model
    from zeroinf.engine.autoplan import probe_checkpoint
    from zeroinf.engine.distributed import group_from_env, rank_device
    from zeroinf.engine.probe import drop_page_cache
    from zeroinf.format import DTYPES, Checkpoint
    from zeroinf.synthetic import SyntheticCheckpoint

    device = rank_device(torch.device(a.device))  # under torchrun: this rank's GPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = None if a.path else group_from_env(device)  # zeroinf.load joins it for --path
    dtype = DTYPES[a.dtype]
    if a.path:
        from zeroinf.convert import ensure_converted

        ckpt = Checkpoint(ensure_converted(a.path, progress=False))
    elif a.offload == "nvme":
        folder = a.nvme_dir or os.path.join(os.getcwd(), ".zeroinf-bench")
        ckpt = Checkpoint(write_shape(a.model, dtype, folder))
    else:
        quant = None
        if a.quantize:
            from zeroinf.convert import Quantization

            quant = Quantization(int(a.quantize[3:]), a.group_size, head=a.quantize_head)
        ckpt = SyntheticCheckpoint(a.model, dtype, quant=quant)
    # Measured now, so the roofline is of this run; cached, so zeroinf.load plans from it too.
    # The disk: the NVMe tier streams from it, and a --path load reads the checkpoint from it.
    disk = a.path is not None or a.offload == "nvme"
    rates = probe_checkpoint(ckpt, device, disk, a.io_backend, refresh=True)
    model = None
    if a.path and not a.plan_only:
        drop_page_cache()  # time to first token from a cold checkpoint
        model = zeroinf.load(a.path, device=device, offload=a.offload, gpu_memory=a.gpu_memory,
                             prefetch=a.prefetch, io_backend=a.io_backend,
                             prefill_tokens=a.prefill_tokens, kv_dtype=a.kv_dtype,
                             batch_size="auto" if a.auto else None, prompt_len=a.prompt_len,
                             max_new_tokens=a.gen_len, kv_tier=a.kv_tier)  # fmt: skip
        plan, load_s = model.plan, model.load_s
    else:
        plan = bench_plan(a, ckpt, device, group.world if group else 1, rates)
    batches = [plan.batch] if a.auto else a.batch_sizes
    if a.plan_only:
        return [plan_only(a, plan, ckpt, rates, b) for b in batches]
    if model is None:
        if a.offload == "nvme":
            drop_page_cache()
        t = time.perf_counter()
        model = Model(ckpt, plan, device, io_backend=a.io_backend, prefill_tokens=a.prefill_tokens,
                      group=group, kv_dtype=a.kv_dtype)  # fmt: skip
        load_s = time.perf_counter() - t
    print(model.plan, flush=True)
    results = []
    for batch in batches:
        results.append(measure(a, model, ckpt, rates, load_s, batch))
    model.close()
    return results


def bench_plan(
    a: argparse.Namespace, ckpt: Checkpoint, device: torch.device, world: int, rates: Rates
) -> Plan:
    """The plan zeroinf.load would make: --batch-size auto plans the whole --gpu-memory budget
    (engine/costmodel.py); a given batch keeps the budget for weights, slots and activations."""
    from dataclasses import replace

    from zeroinf.api import weights_plan
    from zeroinf.engine.autoplan import auto_plan
    from zeroinf.engine.costmodel import Budgets, Workload
    from zeroinf.engine.kvcache import check_kv_tier

    budget = parse_bytes(a.gpu_memory, "--gpu-memory")
    if a.auto:
        work = Workload(a.prompt_len, a.gen_len, a.prefill_tokens)
        budgets = Budgets(budget, None, a.offload, a.prefetch, world)
        return auto_plan(ckpt, device, work, budgets, a.kv_dtype, rates=rates, kv_tier=a.kv_tier)
    plan = weights_plan(ckpt, budget, a.offload, a.prefetch, device, world, a.prefill_tokens,
                        rates.h2d_bytes_per_s)  # fmt: skip
    plan = replace(plan, kv_tier=check_kv_tier(a.kv_tier, planned=False) or "gpu")
    if a.micro_batch:
        b = max(a.batch_sizes)
        if b % a.micro_batch:
            raise ConfigError(f"--micro-batch {a.micro_batch} does not divide --batch-size {b}")
        plan = replace(plan, micro_batch=a.micro_batch, micro_batches=b // a.micro_batch)
    return plan


def predicted(
    a: argparse.Namespace, plan: Plan, ckpt: Checkpoint, rates: Rates, batch: int
) -> Prediction:
    """The cost model's prediction for `batch` rows under `plan`."""
    from zeroinf.engine.costmodel import ModelSize, Workload, predict

    size = ModelSize.from_checkpoint(ckpt, a.kv_dtype)
    work = Workload(a.prompt_len, a.gen_len, a.prefill_tokens)
    return predict(plan, size, rates, work, batch, plan.micro_batch)


def plan_only(
    a: argparse.Namespace, plan: Plan, ckpt: Checkpoint, rates: Rates, batch: int
) -> dict[str, Any]:
    """--plan-only: the plan and its prediction, nothing generated."""
    pred = predicted(a, plan, ckpt, rates, batch)
    print(plan, flush=True)
    print(f"  batch {batch}, prompt {a.prompt_len}, gen {a.gen_len}: predicted prefill "
          f"{pred.prefill_s:.4g} s, decode step {pred.step_s:.4g} s, {pred.tok_s:.4g} tok/s",
          flush=True)  # fmt: skip
    return {
        "model": a.path or a.model, "device": str(plan.device), "offload": a.offload,
        "batch": batch, "micro_batch": plan.micro_batch or batch, "prefetch": plan.prefetch,
        "prompt_len": a.prompt_len, "gen_len": a.gen_len, "gpu_budget": plan.gpu_budget,
        "gpu_bytes": plan.gpu_bytes, "resident_bytes": plan.resident_bytes,
        "streamed_bytes_per_pass": plan.streamed_bytes, "kv_bytes": plan.kv_bytes,
        "kv_tier": plan.kv_tier, "kv_host_bytes": plan.kv_host_bytes,
        "kv_device_layers": list(plan.kv_device_layers), "measured": dataclasses.asdict(rates),
        "predicted_prefill_s": pred.prefill_s, "predicted_step_s": pred.step_s,
        "predicted_tok_per_s": pred.tok_s,
    }  # fmt: skip


def measure(
    a: argparse.Namespace,
    model: Any,
    ckpt: Checkpoint,
    rates: Rates,
    load_s: float,
    batch: int,
) -> dict[str, Any]:
    """Warm up, then one timed generate of `batch` rows, beside its roofline and the cost
    model's prediction (from the rates measured before the run, as a load would plan)."""
    from zeroinf.engine.probe import drop_page_cache
    from zeroinf.engine.roofline import Machine, ModelCost, roofline_seconds

    pred = predicted(a, model.plan, ckpt, rates, batch)
    mach = dataclasses.asdict(rates)
    disk = mach.pop("disk_bytes_per_s")
    del mach["device_name"]

    device = model.device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (batch, a.prompt_len), generator=gen)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Warm-up of the same shape: kernels compiled, cuBLAS handles made, and the KV cache and
    # decode's CUDA graphs captured once, then reused by the timed call (as by every later
    # same-shaped batch of a job); the first call's figure is reported too.
    model.generate(ids, max_new_tokens=a.gen_len)
    first = model.last_stats
    if a.offload == "nvme":
        drop_page_cache()
    if a.trace and device.type == "cuda":
        model.prefetcher.copy_events = []
    host_tier = model.plan.kv_tier != "gpu"  # "cpu" or "split": host attention runs
    if host_tier:
        from zeroinf.models.host_attention import take_stats

        take_stats()  # from here on: the timed call's
    model.generate(ids, max_new_tokens=a.gen_len)
    st = model.last_stats
    host_stats = take_stats() if host_tier else None
    if host_stats is not None:  # how much of the host cache the kernel reads through huge pages
        from zeroinf.io.memory import huge_page_share

        host_cache = [x for kv in model._decode.kv if kv.host for x in (kv.k, kv.v)]
        host_stats["huge_page_share"] = huge_page_share(host_cache)
    profile = model.prefetcher.copy_profile() if a.trace and device.type == "cuda" else {}
    later = []  # --repeat: the same call again on the same cache (the host tier's read rate
    for _ in range(a.repeat - 1):  # has risen minutes into a process: docs/benchmarks.md)
        model.generate(ids, max_new_tokens=a.gen_len)
        again = take_stats() if host_tier else {}
        later.append({"tok_per_s": model.last_stats.tokens_per_s,
                      "decode_step_s": model.last_stats.decode_step_s,
                      "prefill_s": model.last_stats.prefill_s,
                      "kernel_s": again.get("kernel_s")})  # fmt: skip
    plan = model.plan
    if device.type == "cuda":  # H2D is noisy on a shared host: measure again, count the faster
        from zeroinf.engine.probe import measure_h2d

        mach["h2d_bytes_per_s_after"] = measure_h2d(device, nbytes=512 << 20)
        mach["h2d_bytes_per_s"] = max(mach["h2d_bytes_per_s"], mach["h2d_bytes_per_s_after"])
        if host_tier:  # the host memory term of the roofline: the same rule
            from zeroinf.engine.probe import (
                host_reader,
                measure_host_memory,
                seconds,
                streaming_bytes,
            )

            after = measure_host_memory(device, streaming_bytes(4 << 30), 2.0)
            mach["host_memory_bytes_per_s_after"] = after
            mach["host_memory_bytes_per_s"] = max(mach["host_memory_bytes_per_s"] or 0, after)
            # The same reader over the run's own cache (tens of GB, against the probe's 4 GiB):
            # alone (not a roofline term: the kernel has read it faster than torch's sum does),
            # and beside H2D, which the roofline counts as it counts the probe's buffer before
            # and after the run, keeping the fastest of the three (the cache read faster than
            # the probe's buffer in run 63, docs/benchmarks.md).
            read, nbytes = host_reader(0, host_cache)
            mach["host_read_over_cache_bytes_per_s"] = nbytes / seconds(
                read, torch.device("cpu"), 2
            )
            over_cache = measure_host_memory(device, 0, 3.0, over=host_cache)
            mach["host_memory_over_cache_bytes_per_s"] = over_cache
            mach["host_memory_bytes_per_s"] = max(mach["host_memory_bytes_per_s"], over_cache)
    h2d = mach["h2d_bytes_per_s"]
    stream_bw = min(disk, h2d) if disk is not None and a.offload == "nvme" else h2d
    machine = Machine(stream_bw, mach["flops"], mach["hbm_bytes_per_s"],
                      mach["host_memory_bytes_per_s"], mach["d2h_bytes_per_s"])  # fmt: skip
    cost = ModelCost.from_manifest(ckpt.manifest)
    if a.kv_dtype is not None:  # the cache's own bytes
        from zeroinf.engine.kvcache import kv_vector_bytes

        per_vector = kv_vector_bytes(cost.head_dim, cost.itemsize, a.kv_dtype)
        cost = dataclasses.replace(cost, kv_vector_bytes=per_vector)

    def floors(m: Machine) -> tuple[float, float]:  # (prefill, decode) seconds on machine m
        share = len(plan.kv_host_layers(cost.layers)) / cost.layers
        return roofline_seconds(cost, plan.rank_streamed_bytes, m, batch, a.prompt_len,
                                st.new_tokens, kv_host_share=share)  # fmt: skip

    pre_floor, dec_floor = floors(machine)
    roof_tps = batch * st.new_tokens / (pre_floor + dec_floor)
    at_cache = {}
    if "host_memory_over_cache_bytes_per_s" in mach:
        # Not the headline: the same roofline with its host memory term at the rate measured
        # over this run's own cache, which tells the code's share of a gap from the machine's
        # where the probe's buffer read faster (the headline keeps the fastest rate measured).
        cache_rate = mach["host_memory_over_cache_bytes_per_s"]
        slow = dataclasses.replace(machine, host_bytes_per_s=cache_rate)
        tps = batch * st.new_tokens / sum(floors(slow))
        at_cache = {"roofline_tok_per_s_at_cache_rate": tps,
                    "ratio_at_cache_rate": st.tokens_per_s / tps}  # fmt: skip
    steps = max(1, st.new_tokens - 1)
    res: dict[str, Any] = {
        "model": a.path or a.model, "dtype": a.dtype, "device": str(device),
        "quantization": ckpt.manifest.quantization and {
            k: v for k, v in ckpt.manifest.quantization.items() if k != "tensors"},
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"), "offload": a.offload, "prefetch": a.prefetch,
        "batch": batch, "prompt_len": a.prompt_len, "gen_len": st.new_tokens,
        "gpu_budget": plan.gpu_budget, "resident_bytes": plan.resident_bytes,
        "streamed_bytes_per_pass": plan.streamed_bytes, "slots": plan.slots,
        "ranks": plan.world, "rank": model.group.rank if model.group else 0,
        "rank_streamed_bytes_per_pass": plan.rank_streamed_bytes,
        "measured": {**mach, "disk_bytes_per_s": disk},
        "load_s": load_s, "prefill_s": st.prefill_s, "decode_s": st.decode_s,
        "first_token_s": load_s + st.prefill_s,
        "checkpoint_bytes": sum(u.nbytes for u in ckpt.units),
        "decode_step_s": st.decode_step_s, "total_s": st.total_s,
        "prefill_tok_per_s": batch * a.prompt_len / st.prefill_s,
        "decode_tok_per_s": batch * steps / st.decode_s if st.new_tokens > 1 else None,
        "total_tok_per_s": st.tokens_per_s, "micro_batch": model.micro_batch or batch,
        "predicted_prefill_s": pred.prefill_s, "predicted_step_s": pred.step_s,
        "predicted_tok_per_s": pred.tok_s,
        "prediction_error": pred.tok_s / st.tokens_per_s - 1,  # (predicted - measured) / measured
        "roofline_prefill_s": pre_floor, "roofline_decode_s": dec_floor,
        "roofline_tok_per_s": roof_tps, "ratio_to_roofline": st.tokens_per_s / roof_tps,
        "decode_step_vs_transfer": st.decode_step_s / (plan.rank_streamed_bytes / stream_bw)
        if plan.streamed_bytes else None,
        "achieved_stream_GBps_decode": plan.rank_streamed_bytes * steps / st.decode_s / GB,
        "pinned_host_bytes": model.prefetcher.pinned_bytes,
        "copy_profile": profile,
        "host_pass_s": model.executor.host_pass_s,
        "first_call_tok_per_s": first.tokens_per_s, "first_call_decode_s": first.decode_s,
        "kv_dtype": a.kv_dtype or a.dtype, "kv_tier": plan.kv_tier,
        "kv_device_layers": list(plan.kv_device_layers),
        "cuda_graphs_captured_replayed": model.executor.graph_counts,
        "kv_bytes": model.kv_bytes(batch, a.prompt_len + a.gen_len),
        "later_calls": [{**c, "ratio_to_roofline": c["tok_per_s"] / roof_tps} for c in later],
        **at_cache,
    }  # fmt: skip
    if host_stats is not None:  # where a host tier's step goes: the kernel's share, its rate
        read = sum(cost.kv_bytes(batch, a.prompt_len + i + 1) for i in range(steps))
        host_stats["kernel_s_per_step"] = host_stats["kernel_s"] / steps
        host_stats["kernel_bytes_per_s"] = read / host_stats["kernel_s"] if host_stats[
            "kernel_s"] else None  # fmt: skip
        res["host_attention"] = host_stats
    if device.type == "cuda":
        res["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    return res


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b = [r["batch"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(b, [r["roofline_tok_per_s"] for r in results], "k--", label="roofline")
    ax.plot(b, [r["total_tok_per_s"] for r in results], "o-", label="zeroinf")
    r0 = results[0]
    title = f"{r0['model']} {r0['dtype']}, offload {r0['offload']}, {r0['device_name']}"
    ax.set(xlabel="batch size", ylabel="tokens/s", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(r: dict[str, Any]) -> None:
    m = r["measured"]
    if r["copy_profile"]:
        cp = r["copy_profile"]
        print(
            f"  copies: {cp['copies']}, {cp['copy_bytes_per_s'] / GB:.1f} GB/s while copying, "
            f"link busy {cp['busy_fraction']:.3f} of the time; decode idle "
            f"{cp['decode_idle_s']:.3f} s, most before {cp['decode_idle_before']}"
        )
        if cp.get("decode_copy_bytes_per_s_p10_p50_p90"):
            q = " / ".join(f"{v / GB:.1f}" for v in cp["decode_copy_bytes_per_s_p10_p50_p90"])
            print(f"  decode copies' own rates, p10 / p50 / p90: {q} GB/s; the slowest units' "
                  f"median GB/s: {cp['decode_slowest_units']}")  # fmt: skip
        if "gather_s_per_unit" in cp:  # ranks: the share over this rank's link, then NCCL
            print(
                f"  rank {r['rank']}: H2D {cp['h2d_bytes_per_s'] / GB:.1f} GB/s of its share; "
                f"all-gather {cp['gather_s_per_unit'] * 1e3:.2f} ms per unit "
                f"(max {cp['gather_s_max'] * 1e3:.2f})"
            )
        print(f"  host time per decode pass {r['host_pass_s'] * 1e3:.1f} ms")
    h = r.get("host_attention")
    if h and h["kernel_calls"]:
        share = h.get("huge_page_share")
        huge = f"{share:.2f} of its mappings" if share is not None else "unknown"
        keys = []  # how the prompt's keys reached the cache: the copy engine, the writer thread
        if h["dma_bytes"]:
            keys.append(f"prompt keys by DMA into the pinned cache ({h['dma_bytes'] / GB:.1f} GB)")
        if h["writer_bytes"] or not h["dma_bytes"]:
            keys.append(
                f"prompt keys written in {h['writer_s']:.2f} s ({h['writer_bytes'] / GB:.1f} GB)"
            )
        print(
            f"  host attention: {h['kernel_s_per_step']:.3f} s of each decode step in the kernel "
            f"({h['kernel_bytes_per_s'] / GB:.1f} GB/s of cache read); {'; '.join(keys)}; "
            f"huge pages: {huge}"
        )
    print(
        f"\n{r['model']} {r['dtype']} on {r['device_name']} ({r['date']}), offload "
        f"{r['offload']}, batch {r['batch']}, prompt {r['prompt_len']}, gen {r['gen_len']}"
    )
    print(
        f"  measured: stream {m['h2d_bytes_per_s'] / GB:.1f} GB/s H2D"
        + (f", disk {m['disk_bytes_per_s'] / GB:.2f} GB/s" if m["disk_bytes_per_s"] else "")
        + f", matmul {m['flops'] / 1e12:.0f} TFLOP/s, HBM {m['hbm_bytes_per_s'] / GB:.0f} GB/s"
    )
    print(
        (
            f"  rank {r['rank']} of {r['ranks']}: copies "
            f"{r['rank_streamed_bytes_per_pass'] / GB:.2f} GB per pass\n"
            if r["ranks"] > 1
            else ""
        )
        + f"  streamed per pass {r['streamed_bytes_per_pass'] / GB:.2f} GB, resident "
        f"{r['resident_bytes'] / GB:.2f} GB, KV {r['kv_bytes'] / GB:.2f} GB on {r['kv_tier']}, "
        f"load {r['load_s']:.1f} s"
    )
    rows = [
        ("prefill s", r["prefill_s"], r["predicted_prefill_s"], r["roofline_prefill_s"]),
        ("decode step s", r["decode_step_s"], r["predicted_step_s"],
         r["roofline_decode_s"] / max(1, r["gen_len"] - 1)),
        ("total tok/s", r["total_tok_per_s"], r["predicted_tok_per_s"], r["roofline_tok_per_s"]),
    ]  # fmt: skip
    if m["disk_bytes_per_s"]:
        floor = r["checkpoint_bytes"] / m["disk_bytes_per_s"]
        print(
            f"  load + prefill (first token) {r['first_token_s']:.1f} s; checkpoint "
            f"{r['checkpoint_bytes'] / GB:.2f} GB / disk = {floor:.1f} s"
        )
    print(f"  {'':14} {'measured':>10} {'predicted':>10} {'roofline':>10}")
    for name, got, pred, roof in rows:
        print(f"  {name:14} {got:10.4g} {pred:10.4g} {roof:10.4g}")
    print(f"  prediction error {r['prediction_error']:+.1%} (predicted tok/s vs measured); "
          f"ratio to roofline {r['ratio_to_roofline']:.3f}; decode stream "
          f"{r['achieved_stream_GBps_decode']:.1f} GB/s"
          + (f"; step / transfer {r['decode_step_vs_transfer']:.3f}"
             if r["decode_step_vs_transfer"] else "")
          + (f"; max GPU mem {r['max_memory_allocated'] / GB:.2f} GB"
             if "max_memory_allocated" in r else ""))  # fmt: skip
    if r.get("later_calls"):
        calls = ", ".join(f"{c['tok_per_s']:.2f} ({c['ratio_to_roofline']:.3f}; step "
                          f"{c['decode_step_s']:.4f} s)" for c in r["later_calls"])  # fmt: skip
        print(f"  later calls on the same cache: tok/s {calls}")
    if "host_memory_over_cache_bytes_per_s" in m:
        probe, cache = m["host_memory_bytes_per_s"], m["host_memory_over_cache_bytes_per_s"]
        alone = m["host_read_over_cache_bytes_per_s"]
        after = m["host_memory_bytes_per_s_after"]
        print(f"  host memory {probe / GB:.1f} GB/s (the roofline's: the fastest of the probe's "
              f"buffer before and after the run, {after / GB:.1f} after, and this run's cache, "
              f"{cache / GB:.1f}; {alone / GB:.1f} read alone); at the cache's rate the "
              f"roofline would be {r['roofline_tok_per_s_at_cache_rate']:.4g} tok/s, the ratio "
              f"{r['ratio_at_cache_rate']:.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        with torch.inference_mode():
            results = run(a)
    except ZeroInfError as e:
        print(f"zeroinf-bench: error: {e}", file=sys.stderr)
        return 2
    for r in results if not a.plan_only else ():  # --plan-only printed its plan already
        print_table(r)
    if a.json:
        rank = results[0]["rank"] if results[0].get("ranks", 1) > 1 else None
        path = a.json if rank is None else f"{a.json}.rank{rank}"
        with open(path, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=1)
    if a.plot and not a.plan_only:
        plot(results, a.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
