"""A resumable batch job: a JSONL file of prompts in, a JSONL file of completions out.

    python examples/batch_job.py                  # a tiny model made locally, 40 prompts
    python examples/batch_job.py --model PATH     # your checkpoint (HF folder or zeroinf)

It is the same as running the command line yourself:

    zeroinf-generate --model PATH --input prompts.jsonl --output results.jsonl \\
        --max-new-tokens 32 --temperature 0.7 --seed 1

Interrupt it (Ctrl-C) and run it again: finished records are kept and skipped, and the results
are the same as those of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from zeroinf.cli.generate import main as zeroinf_generate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="HF folder or zeroinf checkpoint (default: a tiny model)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "zeroinf-batch-job"),
                   help="where prompts.jsonl and results.jsonl go")  # fmt: skip
    a = p.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)

    model = a.model
    if model is None:
        from zeroinf.tiny import save_tiny_hf

        model = str(work / "tiny-llama")
        if not Path(model, "config.json").exists():
            save_tiny_hf(model, "llama")  # random weights and a word-level tokenizer
    words = [f"w{i}" for i in range(300)]  # the tiny tokenizer's vocabulary

    prompts = work / "prompts.jsonl"
    with open(prompts, "w") as f:
        for i in range(40):
            text = " ".join(words[(7 * i + j) % 300] for j in range(3 + i % 9))
            rec: dict = {"id": f"q{i}", "prompt": text}
            if i % 10 == 0:  # a chat record, rendered by the tokenizer's chat template
                rec = {"id": f"q{i}", "messages": [{"role": "user", "content": text}]}
            if i % 7 == 0:  # per-record settings override the command line's
                rec["max_new_tokens"] = 8
            f.write(json.dumps(rec) + "\n")

    results = work / "results.jsonl"
    code = zeroinf_generate([
        "--model", model, "--input", str(prompts), "--output", str(results),
        "--max-new-tokens", "32", "--temperature", "0.7", "--top-p", "0.95", "--seed", "1",
        "--batch-size", "8",
    ])  # fmt: skip
    if code:
        raise SystemExit(code)
    with open(results) as f:
        first = json.loads(f.readline())
    print(f"first line of {results}:\n{json.dumps(first)[:300]}")


if __name__ == "__main__":
    main()
