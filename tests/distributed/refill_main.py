"""One rank of a multi-rank continuous-refill test (run under torchrun by test_refill_ranks.py).

argv: CKPT OUT_DIR SPEC_JSON. The spec gives each global rank its own calls, in order:
  {"kind": "stream", "seed": s, "n": prompts (0: an empty call), "batch": rows in flight,
   "take": stop reading the stream after this many results (optional: an early close)}
  {"kind": "generate", "seed": s, "n": rows, "new": tokens}
The rank writes OUT_DIR/rank<r>.pt: per call its prompts and outputs, and how many forward
passes it ran and skipped (every rank of a group must run the same number in all)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

import zeroinf
from zeroinf.engine.refill import Request


def requests(seed: int, n: int, vocab: int) -> list[Request]:
    """Prompts of 1..10 ids, each with its own 1..9 new tokens (the rows finish at different
    passes, so rows are refilled in the middle of the others' decode)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 11, (1,), generator=g))
        ids = torch.randint(4, vocab, (length,), generator=g).tolist()
        out.append(Request(ids, int(torch.randint(1, 10, (1,), generator=g)), key=i))
    return out


def main() -> None:
    ckpt, out_dir, spec_path = sys.argv[1:4]
    spec = json.loads(open(spec_path).read())
    rank = int(os.environ["RANK"])
    results: list[dict[str, Any]] = []
    counts = {"forward": 0, "skip": 0}
    with zeroinf.load(ckpt, device="cpu", gpu_memory=spec["budget"], prefetch=2,
                      offload=spec["offload"]) as model:  # fmt: skip
        ex = model.executor
        forward, skip = ex.forward, ex.skip_pass

        def counted_forward(*args: Any, **kwargs: Any) -> Any:
            counts["forward"] += 1
            return forward(*args, **kwargs)

        def counted_skip() -> None:
            counts["skip"] += 1
            skip()

        ex.forward, ex.skip_pass = counted_forward, counted_skip  # type: ignore[method-assign]
        for call in spec["calls"][str(rank)]:
            vocab = model.config.vocab_size
            if call["kind"] == "generate":
                g = torch.Generator().manual_seed(call["seed"])
                ids = torch.randint(4, vocab, (call["n"], 5), generator=g)
                out = model.generate(ids, max_new_tokens=call["new"])
                results.append({"kind": "generate", "ids": ids, "out": out})
                continue
            reqs = requests(call["seed"], call["n"], vocab)
            got = []
            stream = model.generate_stream(reqs, batch_size=call["batch"])
            for req, toks in stream:
                got.append((req.ids, req.max_new_tokens, list(toks)))
                if len(got) == call.get("take", -1):
                    break
            stream.close()  # an early close: the passes this rank agreed to still run
            results.append({"kind": "stream", "n": len(reqs), "rows": got})
        model.finish()  # close() would too; counted here, while the counters are in place
        world = model.group.world if model.group else 1
    torch.save({"results": results, "counts": counts, "world": world},
               os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip


if __name__ == "__main__":
    main()
