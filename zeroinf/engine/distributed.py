"""Ranks that partition the streamed weights (torch.distributed; launched by torchrun).

Within a group (one node by default), rank r keeps only byte range r of every streamed unit
(zeroinf.format.partition), copies it over its own PCIe link, and one all-gather rebuilds the
unit in every rank's device slot. Every rank runs its own requests through that unit, so all
ranks of a group step through units in lockstep: before each generate call they agree on the
number of forward passes (one small all-reduce), and a rank with less or no work joins the
remaining passes' collectives without computing. Continuous refill, whose pass count is not
known up front, makes the same agreement before every pass, asking for one (engine/refill.py);
Model.finish() asks for none until every rank does. Across groups (nodes), replicas are
independent: a group never waits for another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zeroinf.errors import ConfigError


@dataclass(frozen=True)
class RankGroup:
    """This process's place in its partition group."""

    rank: int  # rank within the group
    world: int  # ranks in the group
    control: object  # process group for the per-call agreement (main thread)
    gather: object  # process group for the all-gathers (prefetch worker thread)
    device: torch.device  # where the agreement's tensor lives (NCCL needs a CUDA tensor)

    def agree_passes(self, passes: int) -> int:
        """The largest number of forward passes any rank of the group asks for (0: every rank
        is done). Every rank then runs exactly that many passes, computing or skipping, before
        it agrees again: so generate (its max_new_tokens), refill (1 per pass) and finish (0)
        can meet in any mix."""
        t = torch.tensor([passes], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return int(t.item())


def group_from_env(device: torch.device) -> RankGroup | None:
    """Join (or create) the process group that torchrun describes; None for a single process.

    Group size: ZEROINF_GROUP_SIZE if set, else torchrun's LOCAL_WORLD_SIZE (one group per
    node). Every rank creates every group, in the same order, as torch.distributed requires."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    size = int(os.environ.get("ZEROINF_GROUP_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
    if size < 1 or world % size:
        raise ConfigError(f"ZEROINF_GROUP_SIZE={size}: must divide the world size {world}")
    mine = None
    for first in range(0, world, size):
        ranks = list(range(first, first + size))
        control, gather = dist.new_group(ranks), dist.new_group(ranks)
        if rank in ranks:
            mine = RankGroup(rank - first, size, control, gather, device)
    assert mine is not None
    return mine if mine.world > 1 else None


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA device means this rank's local GPU."""
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
