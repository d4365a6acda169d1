"""Continuous refill under torchrun (gloo, CPU): ranks agree before every forward pass, so each
rank streams its own prompts (unequal numbers, none at all, mixed with generate() calls, a
stream closed early) in lockstep, and every rank's rows equal one process generating one
prompt at a time (float32, greedy)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import zeroinf
from zeroinf.convert import convert
from zeroinf.format import Checkpoint
from zeroinf.tiny import save_tiny_hf

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dist-refill")
    save_tiny_hf(d / "hf", "llama", seed=13, tokenizer=False)
    return Path(convert(d / "hf", d / "zi", progress=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(ckpt: Path, tmp: Path, nproc: int, calls: dict[int, list[dict[str, Any]]],
              offload: str) -> list[dict[str, Any]]:  # fmt: skip
    sizes = [u.nbytes for u in Checkpoint(ckpt).units]
    spec = {"budget": 2 * max(sizes), "offload": offload,  # layers stream
            "calls": {str(r): calls.get(r, []) for r in range(nproc)}}  # fmt: skip
    (tmp / "spec.json").write_text(json.dumps(spec))
    root = str(HERE.parent.parent)  # the checkout, also when zeroinf is not installed
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(HERE / "refill_main.py"), str(ckpt), str(tmp),
           str(tmp / "spec.json")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def check_against_one_process(ckpt: Path, outs: list[dict[str, Any]]) -> int:
    """Every rank's rows equal one resident process's one-prompt-at-a-time generate();
    returns how many rows were checked."""
    checked = 0
    with zeroinf.load(ckpt, device="cpu", gpu_memory=None) as model:
        for o in outs:
            for res in o["results"]:
                if res["kind"] == "generate":
                    ids, out = res["ids"], res["out"]
                    ref = model.generate(ids, max_new_tokens=out.shape[1] - ids.shape[1])
                    torch.testing.assert_close(out, ref, rtol=0, atol=0)
                    continue
                for ids, new, toks in res["rows"]:
                    ref = model.generate(torch.tensor([ids]), max_new_tokens=new)
                    assert toks == ref[0, len(ids) :].tolist()
                    checked += 1
    return checked


def assert_lockstep(outs: list[dict[str, Any]]) -> None:
    """Every pass all-gathers each unit: all ranks ran (computed or skipped) as many passes."""
    totals = {o["counts"]["forward"] + o["counts"]["skip"] for o in outs}
    assert len(totals) == 1, [o["counts"] for o in outs]


@pytest.mark.parametrize("nproc,offload", [(2, "cpu"), (3, "nvme")])
def test_refill_ranks_equal_one_prompt_at_a_time(ckpt: Path, tmp_path: Path, nproc: int,
                                                 offload: str) -> None:  # fmt: skip
    calls = {
        0: [{"kind": "stream", "seed": 1, "n": 7, "batch": 3}],
        1: [{"kind": "stream", "seed": 2, "n": 2, "batch": 2}],
        # rank 2 (when there is one) has no prompts: an empty stream, then it only joins
        2: [{"kind": "stream", "seed": 3, "n": 0, "batch": 4}],
    }
    outs = run_ranks(ckpt, tmp_path, nproc, calls, offload)
    for r, o in enumerate(outs):
        assert o["world"] == nproc
        assert [len(res["rows"]) for res in o["results"]] == [c["n"] for c in calls[r]]
    assert check_against_one_process(ckpt, outs) == 9
    assert_lockstep(outs)
    assert outs[0]["counts"]["skip"] == 0  # the rank with the most work never waits
    assert all(o["counts"]["skip"] > 0 for o in outs[1:])
    if nproc == 3:
        assert outs[2]["counts"]["forward"] == 0


def test_refill_mixed_with_generate_and_an_early_close(ckpt: Path, tmp_path: Path) -> None:
    """A refill pass agreed beside a generate() call covers that call's passes (the stream
    runs several passes per agreement, computing while it has rows); a stream closed after its
    first row still runs the passes its rank agreed to; every call on both ranks finishes."""
    calls = {
        0: [{"kind": "generate", "seed": 5, "n": 2, "new": 9},
            {"kind": "stream", "seed": 4, "n": 5, "batch": 2}],
        1: [{"kind": "stream", "seed": 7, "n": 4, "batch": 3, "take": 1},
            {"kind": "generate", "seed": 6, "n": 1, "new": 8},
            {"kind": "stream", "seed": 8, "n": 3, "batch": 1}],
    }  # fmt: skip
    outs = run_ranks(ckpt, tmp_path, 2, calls, "cpu")
    assert [len(res.get("rows", [])) for res in outs[0]["results"]] == [0, 5]
    assert [len(res.get("rows", [])) for res in outs[1]["results"]] == [1, 0, 3]
    # rank 1's first stream agreed to rank 0's 9 generate() passes and closed after a row of
    # fewer tokens: the rest of those 9 passes ran as skipped passes inside the stream's close
    assert outs[1]["results"][0]["rows"][0][1] < 9
    assert check_against_one_process(ckpt, outs) == 9
    assert_lockstep(outs)
