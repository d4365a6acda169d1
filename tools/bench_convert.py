"""Convert a >= 2 GB checkpoint and measure throughput and peak RSS.

    python tools/bench_convert.py                      # makes a Llama-2-7B-shaped 5-layer model
    python tools/bench_convert.py --src ~/models/X     # or converts an HF folder you have

The synthetic source is written with safetensors directly (no transformers model in memory),
in several shards, then evicted from the page cache (posix_fadvise) so the conversion reads it
from disk. The conversion runs in a child process; its peak RSS is that process's high-water mark
(VmHWM, imports included). The target: peak RSS < 3x the largest unit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9

# VmHWM is this process's own peak RSS (ru_maxrss would inherit the parent's across exec).
CHILD = r"""
import json, sys, time
import torch  # the baseline below includes torch, as a real run's does
from zeroinf.convert import convert
from zeroinf.format import Checkpoint
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
base = status("VmRSS")
src, dst, dtype = sys.argv[1], sys.argv[2], sys.argv[3] if sys.argv[3] != "auto" else None
t0 = time.perf_counter()
convert(src, dst, dtype=dtype, force=True, progress=True)
dt = time.perf_counter() - t0
peak = status("VmHWM")
t1 = time.perf_counter()
ck = Checkpoint(dst)
ck.verify_all()
check_s = time.perf_counter() - t1
units = [u.nbytes for u in ck.units]
print(json.dumps(dict(seconds=dt, peak_rss=peak, baseline_rss=base, units=units, check_s=check_s)))
"""


def make_source(folder: Path, layers: int, shard_bytes: int) -> None:
    """A Llama-2-7B-shaped checkpoint (bf16) with `layers` layers, random weights, sharded."""
    import torch
    from safetensors.torch import save_file

    d, ff, vocab, kv = 4096, 11008, 32000, 4096
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (d,)),
            (p + "post_attention_layernorm.weight", (d,)),
            (p + "self_attn.q_proj.weight", (d, d)),
            (p + "self_attn.k_proj.weight", (kv, d)),
            (p + "self_attn.v_proj.weight", (kv, d)),
            (p + "self_attn.o_proj.weight", (d, d)),
            (p + "mlp.gate_proj.weight", (ff, d)),
            (p + "mlp.up_proj.weight", (ff, d)),
            (p + "mlp.down_proj.weight", (d, ff)),
        ]
    shapes += [("model.norm.weight", (d,)), ("lm_head.weight", (vocab, d))]
    folder.mkdir(parents=True)
    # Group into shards in reverse order, so units straddle shards and files are not in unit order.
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in reversed(shapes):
        nb = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nb > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nb
    weight_map = {}
    g = torch.Generator().manual_seed(0)
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in group}
        save_file(tensors, folder / fname)
        weight_map.update({n: fname for n in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=d,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=vocab,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache, so the conversion reads from the disk."""
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, help="an HF folder to convert (default: make one)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/zeroinf-bench-convert"))
    ap.add_argument("--layers", type=int, default=5, help="layers of the synthetic model")
    ap.add_argument("--shard-gb", type=float, default=0.7, help="synthetic shard size (GB)")
    ap.add_argument("--dtype", default="auto", help="conversion dtype (default: the source's)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    src = args.src
    if src is None:
        src = args.work / "hf"
        if not (src / "config.json").is_file():
            shutil.rmtree(src, ignore_errors=True)
            t0 = time.perf_counter()
            make_source(src, args.layers, int(args.shard_gb * GB))
            print(f"made {src} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    shards = len(list(src.glob("*.safetensors")))
    evict(src)
    dst = args.work / "zi"
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(src), str(dst), args.dtype],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        check=True,
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    total, largest = sum(r["units"]), max(r["units"])
    print(f"source      {src} ({shards} shards, {src_bytes / GB:.2f} GB, page cache evicted)")
    print(f"converted   {len(r['units'])} units, {total / GB:.2f} GB in {r['seconds']:.2f} s")
    print(f"throughput  {total / GB / r['seconds']:.2f} GB/s (read + cast + write + fsync + CRC32)")
    print(
        f"peak RSS    {r['peak_rss'] / GB:.2f} GB (after imports: {r['baseline_rss'] / GB:.2f} GB)"
    )
    print(f"largest     unit {largest / GB:.3f} GB")
    print(f"ratio       peak RSS / largest unit = {r['peak_rss'] / largest:.2f} (target < 3)")
    print(f"check       {total / GB / r['check_s']:.2f} GB/s (sizes + CRC32 of every unit)")
    if not args.keep:
        shutil.rmtree(dst, ignore_errors=True)
        if args.src is None:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
