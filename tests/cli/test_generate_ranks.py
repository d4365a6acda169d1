"""zeroinf-generate under torchrun (gloo, CPU): each rank runs its share of the records through
the partitioned model, rank 0 merges the part files, and the output equals a single process's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from zeroinf.cli.generate import main
from zeroinf.convert import convert
from zeroinf.format import Checkpoint
from zeroinf.jobs.output import output_key, scan

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(args: list[str], cwd: Path) -> list[str]:
    """zeroinf-generate ARGS under torchrun with 2 ranks: the ranks' summary lines, sorted."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           f"--master-port={free_port()}", "-m", "zeroinf.cli.generate", *args]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(x for x in proc.stdout.splitlines() if x.startswith("zeroinf-generate: "))
    assert len(summaries) == 2, proc.stdout
    return summaries


def results(path: Path) -> dict:
    lines, size = scan(path)
    assert size == path.stat().st_size
    keys = [output_key(o) for o in lines]
    assert len(keys) == len(set(keys)), "a record was written twice"
    return dict(zip(keys, lines, strict=True))


def test_two_ranks_equal_one_process(tiny_hf: Callable[..., Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    ckpt = Path(convert(tiny_hf("llama"), tmp_path / "zi", progress=False))
    recs = [{"id": f"r{i}", "prompt": " ".join(f"w{3 * i + j}" for j in range(1 + i))}
            for i in range(6)]  # fmt: skip
    recs[3] = {"id": "r3", "input_ids": [999]}  # out of the vocabulary: an error line
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs[:5]) + "{bad\n" + json.dumps(recs[5]))
    budget = str(3 * max(u.nbytes for u in Checkpoint(ckpt).units))  # layers stream
    args = ["--model", str(ckpt), "--input", str(inp), "--device", "cpu", "--quiet",
            "--gpu-memory", budget, "--max-new-tokens", "5", "--temperature", "0.7",
            "--batch-size", "2"]  # fmt: skip
    single = tmp_path / "single.jsonl"
    assert main([*args, "--output", str(single)]) == 0
    capsys.readouterr()

    out = tmp_path / "ranks.jsonl"
    summaries = two_ranks([*args, "--output", str(out)], tmp_path)
    # rank 0 runs lines 1, 3, 5, 7 (r0, r2, r4, r5), rank 1 lines 2, 4, 6 (r1, r3, the bad one)
    assert summaries[0].startswith("zeroinf-generate: rank 0/2: 4 ok, 0 failed")
    assert "merged the part files (7 lines)" in summaries[0]
    assert summaries[1].startswith("zeroinf-generate: rank 1/2: 1 ok, 2 failed")
    assert sorted(p.name for p in tmp_path.iterdir() if "ranks" in p.name) == ["ranks.jsonl"]
    assert results(out) == results(single)


# zeroinf-generate --refill under torchrun: each rank streams its share of the records through
# continuous refill, the ranks agreeing before every pass; the output equals a single
# process's --refill run (and, greedy, the static batches' run).
def test_refill_two_ranks_equal_one_process(
    tiny_hf: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = Path(convert(tiny_hf("llama"), tmp_path / "zi", progress=False))
    # unequal work: rank 0 gets r0, r2, r4, r6 (long ones), rank 1 r1, r3 (an error), r5
    recs = [{"id": f"r{i}", "prompt": " ".join(f"w{3 * i + j}" for j in range(1 + i % 4)),
             "max_new_tokens": 2 + (5 * i) % 7} for i in range(7)]  # fmt: skip
    recs[3] = {"id": "r3", "input_ids": [999]}  # out of the vocabulary: an error line
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    budget = str(3 * max(u.nbytes for u in Checkpoint(ckpt).units))  # layers stream
    args = ["--model", str(ckpt), "--input", str(inp), "--device", "cpu", "--quiet",
            "--gpu-memory", budget, "--temperature", "0", "--batch-size", "2"]  # fmt: skip
    single = tmp_path / "single.jsonl"
    assert main([*args, "--refill", "--output", str(single)]) == 0
    static = tmp_path / "static.jsonl"
    assert main([*args, "--output", str(static)]) == 0
    capsys.readouterr()

    out = tmp_path / "ranks.jsonl"
    summaries = two_ranks([*args, "--refill", "--output", str(out)], tmp_path)
    assert summaries[0].startswith("zeroinf-generate: rank 0/2: 4 ok, 0 failed")
    assert "merged the part files (7 lines)" in summaries[0]
    assert summaries[1].startswith("zeroinf-generate: rank 1/2: 2 ok, 1 failed")
    assert sorted(p.name for p in tmp_path.iterdir() if "ranks" in p.name) == ["ranks.jsonl"]
    got = results(out)
    assert got == results(single)
    assert got == results(static)  # greedy: refill's rows equal the static batches' rows
    assert sum("error" in o for o in got.values()) == 1
