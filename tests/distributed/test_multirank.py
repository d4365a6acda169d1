"""Partitioned weights across ranks (gloo, torchrun on the CPU): every rank's outputs equal a
single process's on the same prompts; unequal work (including none) finishes without hanging;
each rank holds ~1/N of the streamed bytes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zeroinf
from zeroinf.convert import convert
from zeroinf.format import Checkpoint, partition
from zeroinf.tiny import save_tiny_hf

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("dist")
    save_tiny_hf(d / "hf", "llama", seed=11)
    return Path(convert(d / "hf", d / "zi", progress=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(ckpt: Path, tmp: Path, nproc: int, calls: dict[int, list[dict]], offload: str,
              group_size: int | None = None, device: str = "cpu") -> list[dict]:  # fmt: skip
    sizes = [u.nbytes for u in Checkpoint(ckpt).units]
    spec = {"budget": 2 * max(sizes), "offload": offload, "device": device,
            "calls": {str(r): calls.get(r, []) for r in range(nproc)}}  # fmt: skip
    (tmp / "spec.json").write_text(json.dumps(spec))
    root = str(HERE.parent.parent)  # the checkout, also when zeroinf is not installed
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    if group_size:
        env["ZEROINF_GROUP_SIZE"] = str(group_size)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(HERE / "rank_main.py"), str(ckpt), str(tmp),
           str(tmp / "spec.json")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


def single_process(ckpt: Path, results: list, device: str = "cpu") -> None:
    """Oracle: one process, everything resident, same prompts."""
    with zeroinf.load(ckpt, device=device, gpu_memory=None) as model:
        for ids, out in results:
            ref = model.generate(ids, max_new_tokens=out.shape[1] - ids.shape[1])
            torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("nproc,offload", [(2, "cpu"), (3, "nvme")])
def test_ranks_match_single_process_with_unequal_work(ckpt: Path, tmp_path: Path, nproc: int,
                                                      offload: str) -> None:  # fmt: skip
    calls = {
        0: [{"seed": 1, "n": 3, "new": 6}, {"seed": 2, "n": 1, "new": 9}],
        1: [{"seed": 3, "n": 2, "new": 3}],
        # rank 2 (when there is one) gets no prompts at all
    }
    outs = run_ranks(ckpt, tmp_path, nproc, calls, offload)
    for r, o in enumerate(outs):
        assert o["world"] == nproc
        assert len(o["results"]) == len(calls.get(r, []))
        single_process(ckpt, o["results"])
    if offload == "cpu":  # the CPU tier: each rank holds its own share of every streamed unit,
        # and the whole embed unit, whose table's rows it gathers (engine/gather.py)
        units = Checkpoint(ckpt).units
        embed = next(u.nbytes for u in units if u.name == "embed")
        for r, o in enumerate(outs):
            share = sum(partition(u.nbytes, r, nproc)[1] - partition(u.nbytes, r, nproc)[0]
                        for u in units if u.name != "embed")  # fmt: skip
            assert o["host_bytes"] == share + embed
            assert o["host_bytes"] <= o["streamed"] / nproc + embed + len(units) * 4096


def test_two_groups_are_independent_replicas(ckpt: Path, tmp_path: Path) -> None:
    """4 ranks as 2 groups of 2 (as 2 nodes would be): each group partitions within itself."""
    calls = {0: [{"seed": 5, "n": 2, "new": 4}], 1: [], 2: [{"seed": 6, "n": 1, "new": 7}],
             3: [{"seed": 7, "n": 2, "new": 2}]}  # fmt: skip
    outs = run_ranks(ckpt, tmp_path, 4, calls, "cpu", group_size=2)
    for o in outs:
        assert o["world"] == 2
        single_process(ckpt, o["results"])


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_gpu_ranks_nccl_unequal_work(ckpt: Path, tmp_path: Path) -> None:
    """2 GPU ranks over NCCL, one with three calls and one with a single shorter one: no hang,
    and each rank's ids equal one GPU process's with everything resident."""
    calls = {0: [{"seed": 1, "n": 3, "new": 6}, {"seed": 2, "n": 1, "new": 9},
                 {"seed": 4, "n": 2, "new": 5}], 1: [{"seed": 3, "n": 2, "new": 3}]}  # fmt: skip
    outs = run_ranks(ckpt, tmp_path, 2, calls, "cpu", device="cuda")
    for r, o in enumerate(outs):
        assert o["world"] == 2 and len(o["results"]) == len(calls[r])
        single_process(ckpt, o["results"], device="cuda")
