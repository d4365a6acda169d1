"""Per-rank step timings of partitioned streaming on the CPU (gloo), for the multi-GPU note.

    python tools/dist_cpu_timing.py                 # a small llama; 1 and 2 ranks
    torchrun --nproc-per-node N tools/dist_cpu_timing.py CKPT   # one run (used above)

Every unit streams (the budget holds just the slots); each rank generates its own batch.
On a CPU the "link" is a memcpy and the all-gather goes through gloo, so these figures show the
control flow's cost per rank, not GPU speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_rank(ckpt: str) -> None:
    import zeroinf
    from zeroinf.format import Checkpoint

    largest = max(u.nbytes for u in Checkpoint(ckpt).units)
    rank = int(os.environ.get("RANK", "0"))
    with zeroinf.load(ckpt, device="cpu", gpu_memory=2 * largest, progress=False) as m:
        ids = torch.randint(
            4, m.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(rank)
        )
        m.generate(ids, max_new_tokens=2)  # warm-up
        m.generate(ids, max_new_tokens=16)
        s = m.last_stats
        out = {"rank": rank, "world": m.group.world if m.group else 1,
               "decode_step_ms": s.decode_step_s * 1e3, "prefill_ms": s.prefill_s * 1e3,
               "host_bytes": m.prefetcher.host_bytes,
               "streamed": m.plan.streamed_bytes}  # fmt: skip
    print("RESULT " + json.dumps(out), flush=True)


def main() -> None:
    if len(sys.argv) > 1:
        one_rank(sys.argv[1])
        return
    from zeroinf.convert import convert
    from zeroinf.tiny import save_tiny_hf

    d = Path(tempfile.mkdtemp())
    save_tiny_hf(d / "hf", "llama", tokenizer=False, hidden_size=512, intermediate_size=1536,
                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)  # fmt: skip
    ckpt = convert(d / "hf", d / "zi", progress=False)
    rows = []
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}",
               "--master-port=29611", __file__, str(ckpt)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        rows += [json.loads(x[7:]) for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    print(f"{'ranks':>5} {'rank':>4} {'decode ms/step':>15} {'prefill ms':>11} {'host MB':>8} "
          f"{'streamed MB':>12}")  # fmt: skip
    for r in rows:
        print(f"{r['world']:>5} {r['rank']:>4} {r['decode_step_ms']:>15.1f} "
              f"{r['prefill_ms']:>11.1f} {r['host_bytes'] / 1e6:>8.1f} "
              f"{r['streamed'] / 1e6:>12.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
