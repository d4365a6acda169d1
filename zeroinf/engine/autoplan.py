"""A checkpoint's plan from the machine's cached rates: what zeroinf.load(batch_size="auto"),
zeroinf-bench and zeroinf-generate share (the cost model itself is costmodel.py)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from zeroinf.engine.costmodel import Budgets, ModelSize, Workload, choose_plan
from zeroinf.engine.kvcache import check_kv_tier
from zeroinf.engine.plan import Plan
from zeroinf.engine.probe import Rates, probe
from zeroinf.errors import ConfigError
from zeroinf.format import DTYPES, Checkpoint
from zeroinf.models import ModelConfig
from zeroinf.sizes import fmt_bytes, parse_bytes

log = logging.getLogger("zeroinf")

# Share of the host's available memory a plan leaves to the process itself (Python, torch's
# allocators, staging buffers) and to the rest of the machine.
HOST_RESERVE = 0.1


def check_batch_args(
    batch_size: int | str | None, prompt_len: int | None, max_new_tokens: int | None
) -> bool:
    """True when the planner sizes the batch (batch_size="auto"); ConfigError for a bad value or
    a length the planner needs but was not given."""
    if batch_size == "auto":
        for name, v in (("prompt_len", prompt_len), ("max_new_tokens", max_new_tokens)):
            if v is None:
                raise ConfigError(
                    f"batch_size='auto' needs {name} (the planner sizes the KV cache and "
                    "predicts tokens/s for the longest prompt and its new tokens)"
                )
        return True
    ok = batch_size is None or isinstance(batch_size, int) and not isinstance(batch_size, bool)
    if not ok or batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: an integer >= 1, 'auto' or None")
    return False


def free_device_bytes(device: torch.device) -> int:
    """Memory free on the device now (host memory available for a CPU device)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available()


def probe_checkpoint(
    ckpt: Checkpoint,
    device: torch.device,
    disk: bool,
    io_backend: str | None = None,
    refresh: bool = False,
) -> Rates:
    """The probe at this model's matmul shape and dtype; `disk`: with the read rate of the
    checkpoint's folder (the NVMe tier streams from it)."""
    cfg = ModelConfig.from_hf(ckpt.config)
    dtype = DTYPES[ckpt.manifest.dtype]
    folder = ckpt.path if disk else None
    return probe(device, cfg.hidden_size, cfg.intermediate_size, dtype, folder, io_backend, refresh)


def auto_plan(
    ckpt: Checkpoint,
    device: torch.device,
    work: Workload,
    budgets: Budgets,
    kv_dtype: str | None = None,
    io_backend: str | None = None,
    rates: Rates | None = None,
    kv_tier: str | None = None,
) -> Plan:
    """choose_plan for a checkpoint, from the cached probe unless `rates` are given. kv_tier:
    None lets the planner choose the KV tier (kvcache.check_kv_tier); on a GPU the host memory
    available now, less HOST_RESERVE and split between the group's ranks, is the host budget
    (pinned units and a host KV cache), unless given."""
    check_kv_tier(kv_tier)
    size = ModelSize.from_checkpoint(ckpt, kv_dtype)
    if rates is None:
        rates = probe_checkpoint(ckpt, device, budgets.offload == "nvme", io_backend)
    if budgets.host is None and device.type == "cuda":
        # The ranks of a group share one host, each with its share of the pinned units and its
        # own host KV cache. On a CPU device the device budget is host memory already: the host
        # tier is searched there only when asked for (costmodel.search_tiers).
        host = int(host_available() * (1 - HOST_RESERVE)) // budgets.world
        budgets = dataclasses.replace(budgets, host=host)
    tiers = (kv_tier,) if kv_tier else None
    return choose_plan(size, rates, work, budgets, str(device), kv_tiers=tiers)


def host_available() -> int:
    """Host memory available now (psutil), what pinned units and a host KV cache share."""
    import psutil

    return psutil.virtual_memory().available


def whole_budget(gpu_memory: int | str | None, device: torch.device) -> int:
    """gpu_memory as the whole device budget; None: the memory free on the device now."""
    budget = parse_bytes(gpu_memory, "gpu_memory")
    if budget is None:
        budget = free_device_bytes(device)
        log.info("gpu_memory=None: planning for the %s free on %s", fmt_bytes(budget), device)
    return budget
