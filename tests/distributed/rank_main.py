"""One rank of a multi-rank test job (run under torchrun by test_multirank.py).

argv: CKPT OUT_DIR PLAN_JSON. The plan gives each global rank its own prompts (possibly none)
and generate calls; the rank writes its outputs and its host-tier bytes to OUT_DIR/rank<r>.pt."""

from __future__ import annotations

import json
import os
import sys

import torch

import zeroinf


def main() -> None:
    ckpt, out_dir, plan_path = sys.argv[1:4]
    spec = json.loads(open(plan_path).read())
    rank = int(os.environ["RANK"])
    mine = spec["calls"][str(rank)]  # list of calls: [{"seed": s, "n": rows, "new": tokens}]
    results = []
    device = spec.get("device", "cpu")  # "cuda": each rank takes its local GPU
    with zeroinf.load(ckpt, device=device, gpu_memory=spec["budget"], prefetch=2,
                      offload=spec["offload"]) as model:  # fmt: skip
        for call in mine:
            g = torch.Generator().manual_seed(call["seed"])
            ids = torch.randint(4, model.config.vocab_size, (call["n"], 5), generator=g)
            out = model.generate(ids, max_new_tokens=call["new"])
            results.append((ids, out.cpu()))
        arena = model.prefetcher.arena  # the CPU tier and the embed unit kept on the host
        host = arena.nbytes if arena else 0
        streamed = model.plan.streamed_bytes
        world = model.group.world if model.group else 1
    torch.save({"results": results, "host_bytes": host, "streamed": streamed, "world": world},
               os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip


if __name__ == "__main__":
    main()
