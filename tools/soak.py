"""Soak test (CPU, not in CI): zeroinf-generate runs for N minutes while faults hit it every few
seconds, then every output is checked for exactly-once records equal to an unfaulted run.

    python tools/soak.py --minutes 2
    python tools/soak.py --minutes 30 --io-faults "eio=0.0005,short=0.0002,delay=0.01,delay_s=0.05"

A tiny random Llama is made and converted locally (nothing is downloaded). The same job (some
bad records among the good ones, sampled with per-record seeds) runs round after round, each
round into a fresh output file. Within a round the job is started, hit after a random
1-4 s by SIGKILL (most often), SIGINT or SIGTERM, and restarted, until a run finishes; the
reader injects EIO, short reads and delays (ZEROINF_IO_FAULTS, zeroinf/io/faults.py), so a run
may also end with exit 2 naming the file and offset. A finished round's output must equal the
reference run's: every record exactly once, byte-for-byte the same result, no torn line.
Prints the figures; exit status 1 if any round differed or a run ended in an unexpected way.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

PRELOAD = ["zeroinf.api", "zeroinf.cli.generate", "zeroinf.jobs", "transformers", "tokenizers"]
READ_ERROR = re.compile(
    r"zeroinf-generate: error: \S+\.bin: read of \d+ bytes at offset \d+ failed at offset \d+: "
    r"(Input/output error \(errno 5\)|unexpected end of file \(truncated\?\))"
)


def child(argv: list[str], log: str, env: dict[str, str]) -> None:
    """One zeroinf-generate process: output into `log`, exit status = the CLI's."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from zeroinf.cli.generate import main

    try:
        code = main(argv)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the CLI is over
        sys.stdout.flush()
        sys.stderr.flush()
    raise SystemExit(code)


def results(path: Path) -> tuple[dict[str, Any], list[str]]:
    """Lines by key, and what is wrong with the file (a torn tail, a repeated key)."""
    data = path.read_bytes() if path.exists() else b""
    problems, out = [], {}
    if data and not data.endswith(b"\n"):
        problems.append("torn tail")
    for line in data.split(b"\n")[:-1]:
        obj = json.loads(line)
        key = f"line {obj['line']}" if "line" in obj else json.dumps(obj["id"])
        if key in out:
            problems.append(f"{key} written twice")
        out[key] = obj
    return out, problems


def make_model(work: Path) -> Path:
    from zeroinf.convert import convert
    from zeroinf.tiny import save_tiny_hf

    save_tiny_hf(work / "hf", "llama", seed=11)
    return convert(work / "hf", work / "zi", progress=False)


def make_input(path: Path, n: int, rng: random.Random) -> None:
    lines = []
    for i in range(n):
        words = " ".join(f"w{rng.randrange(300)}" for _ in range(rng.randint(1, 12)))
        rec: dict[str, Any] = {"id": f"r{i}", "prompt": words}
        if i % 10 == 3:
            rec["max_new_tokens"] = rng.randint(1, 8)
        lines.append(json.dumps(rec))
    lines[7] = json.dumps({"id": "r7", "prompt": ""})  # error lines are records too
    lines.insert(len(lines) // 2, "{not json")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=2.0, help="how long to inject faults")
    p.add_argument("--records", type=int, default=120, help="records per round (default 120)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--offload",
        choices=("cpu", "nvme"),
        default="nvme",
        help="nvme (default): every pass reads unit files, so read faults land",
    )
    p.add_argument(
        "--kill-every",
        type=float,
        nargs=2,
        default=(1.0, 4.0),
        metavar=("MIN", "MAX"),
        help="seconds between signals, drawn uniformly (default 1 4)",
    )
    p.add_argument(
        "--io-faults",
        default="eio=0.0005,short=0.0002,delay=0.01,delay_s=0.05",
        help="ZEROINF_IO_FAULTS for the jobs ('' for none)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="folder for the model and outputs (default: a temp folder)")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    work = Path(a.work or tempfile.mkdtemp(prefix="zeroinf-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = "1"
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)

    t0 = time.monotonic()
    ckpt = make_model(work)
    inp = work / "in.jsonl"
    make_input(inp, a.records, rng)
    # the budget of 3 layers: 2 streaming slots and 1 resident layer; the rest streams
    budget = str(3 * max(f.stat().st_size for f in ckpt.glob("*.bin")))
    base = [
        "--model",
        str(ckpt),
        "--input",
        str(inp),
        "--device",
        "cpu",
        "--offload",
        a.offload,
        "--gpu-memory",
        budget,
        "--batch-size",
        str(a.batch_size),
        "--max-new-tokens",
        str(a.max_new_tokens),
        "--temperature",
        "0.8",
        "--top-k",
        "40",
        "--seed",
        "3",
        "--quiet",
    ]
    n = Counter[str]()
    runs = 0

    def start(out: Path, faults: str) -> Any:
        nonlocal runs
        runs += 1
        log = str(work / f"run{runs}.log")
        env = {"ZEROINF_IO_FAULTS": faults} if faults else {}
        proc = ctx.Process(target=child, args=([*base, "--output", str(out)], log, env))
        proc.start()
        proc.log = log
        return proc

    ref_out = work / "reference.jsonl"
    proc = start(ref_out, "")
    proc.join()
    assert proc.exitcode == 0, Path(proc.log).read_text()
    reference, problems = results(ref_out)
    assert not problems and len(reference) == a.records + 1, problems
    print(
        f"soak: {a.records} records (+1 broken line) per round; reference run done in "
        f"{time.monotonic() - t0:.1f} s; faults for {a.minutes} min",
        flush=True,
    )

    deadline = time.monotonic() + 60 * a.minutes
    rounds, anomalies = 0, []
    while time.monotonic() < deadline:
        rounds += 1
        out = work / f"out{rounds}.jsonl"
        while True:
            faulty = time.monotonic() < deadline
            proc = start(out, a.io_faults if faulty else "")
            n["job starts"] += 1
            wait = rng.uniform(*a.kill_every)
            proc.join(wait if faulty else None)
            if proc.is_alive():
                sig = rng.choices([signal.SIGKILL, signal.SIGINT, signal.SIGTERM], [6, 2, 2])[0]
                try:
                    os.kill(proc.pid, sig)
                    n[f"{signal.Signals(sig).name} sent"] += 1
                except ProcessLookupError:
                    pass  # it had just finished
                proc.join()
            log = Path(proc.log).read_text()
            n["delays injected"] += log.count("injected a ")
            code = proc.exitcode
            if code == 0:
                break
            if code == -signal.SIGKILL:
                n["runs killed (SIGKILL)"] += 1
            elif code in (130, 143):
                n[f"runs interrupted cleanly (exit {code})"] += 1
            elif code == 2 and READ_ERROR.search(log):
                what = "EIO" if "Input/output" in READ_ERROR.search(log)[0] else "short read"
                n[f"runs ended by an injected {what} (exit 2, file and offset named)"] += 1
            else:
                anomalies.append(f"round {rounds}: exit {code}: {log[-2000:]}")
        got, problems = results(out)
        n["records checked"] += len(got)
        lost = [k for k in reference if k not in got]
        wrong = [k for k in reference if k in got and got[k] != reference[k]]
        extra = [k for k in got if k not in reference]
        if problems or lost or wrong or extra:
            anomalies.append(
                f"round {rounds}: {problems} lost={lost[:5]} wrong={wrong[:5]} extra={extra[:5]}"
            )
        print(
            f"round {rounds}: done after {n['job starts']} job starts in all; "
            f"{len(got)} records, exactly once and equal to the reference: "
            f"{not (problems or lost or wrong or extra)}",
            flush=True,
        )

    print(
        f"\nsoak figures ({time.monotonic() - t0:.0f} s, offload={a.offload}, "
        f"ZEROINF_IO_FAULTS={a.io_faults!r}):"
    )
    print(f"  rounds completed and verified: {rounds}")
    for k, v in sorted(n.items()):
        print(f"  {k}: {v}")
    print(f"  records lost, duplicated or different: {len(anomalies) and 'SEE BELOW' or 0}")
    for x in anomalies:
        print("ANOMALY", x)
    return 1 if anomalies else 0


if __name__ == "__main__":
    sys.exit(main())
