"""The cost model: predicted seconds of a generation run under a plan, and the search for the
plan with the most tokens/s that fits the GPU, CPU and disk budgets (docs/planner.md).

Per forward pass (the prefill, then one pass per decode step):

    pass_s    = overlap(stream_s, compute_s) + PASS_OVERHEAD_S
    stream_s  = streamed bytes of this rank / (H2D, or min(disk, H2D) from NVMe)
    compute_s = sum over the pass's micro-batches k of
                FLOPs_k / matmul rate + HBM bytes_k / HBM rate + units * LAUNCH_S
    HBM bytes_k = every weight (each micro-batch reads each unit again)
                + KV read (rows_k x context x kv bytes per token)
                + activations (ACT_TRAFFIC x activation bytes of a token in a layer x tokens_k
                  x layers)
    overlap   = max(stream, compute) with two or more slots (the copy of unit j+1 runs while j
                computes); max(stream + f x compute, compute) with one slot, f = the streamed
                share of the weight bytes (a streamed unit's copy waits for the previous one's
                compute to free the slot).

Rates come from probe.py (measured on this machine, cached). The search tries every KV tier
the executor can run (plan.KV_TIERS), prefetch depth, batch and micro-batch count; each
candidate's resident set is make_plan's for the budget left after its KV cache and activation
workspace, so a chosen plan never accounts for more than the budget.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from zeroinf.engine.kvcache import kv_token_bytes
from zeroinf.engine.plan import KV_TIERS, Plan, make_plan
from zeroinf.engine.probe import Rates
from zeroinf.engine.roofline import ModelCost
from zeroinf.errors import ConfigError, PlanError
from zeroinf.format import DTYPES, Checkpoint
from zeroinf.models import ModelConfig
from zeroinf.sizes import fmt_bytes

PASS_OVERHEAD_S = 1e-3  # per forward pass: sampling, the host's sync, Python around the loop
LAUNCH_S = 20e-6  # per unit and micro-batch: kernel launches the device waits on when idle
ACT_TRAFFIC = 2.0  # each activation byte is written once and read once per layer
MICRO_BATCHES = (1, 2, 4, 8)  # micro-batch counts tried


@dataclass(frozen=True)
class ModelSize:
    """What the cost model needs to know about a checkpoint."""

    units: tuple[tuple[str, int], ...]  # (unit name, bytes) in execution order
    cost: ModelCost  # FLOPs of a pass (roofline.py)
    cfg: ModelConfig  # activation sizes
    itemsize: int  # bytes of the weights' dtype (activations have it too)
    kv_token_bytes: int  # K + V over all layers for one token of one row (kvcache.py)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, kv_dtype: str | None = None) -> ModelSize:
        cfg = ModelConfig.from_hf(ckpt.config)
        itemsize = DTYPES[ckpt.manifest.dtype].itemsize
        return cls(
            tuple((u.name, u.nbytes) for u in ckpt.units),
            ModelCost.from_manifest(ckpt.manifest),
            cfg,
            itemsize,
            kv_token_bytes(cfg, itemsize, kv_dtype),
        )

    @property
    def weight_bytes(self) -> int:
        return sum(nb for _, nb in self.units)


@dataclass(frozen=True)
class Workload:
    prompt_len: int  # tokens per row (the longest prompt: KV and prefill are sized by it)
    gen_len: int  # new tokens per row
    prefill_tokens: int = 2048  # the prefill runs in chunks of rows of at most this many tokens
    max_batch: int = 1024  # the search's cap on rows

    def __post_init__(self) -> None:
        for name in ("prompt_len", "gen_len", "prefill_tokens", "max_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: must be >= 1")


@dataclass(frozen=True)
class Budgets:
    gpu: int  # the whole device budget: resident weights, slots, KV cache, activations
    cpu: int | None = None  # host bytes for the CPU tier (None: no cap)
    offload: str = "cpu"  # where streamed units live: "cpu" | "nvme"
    max_prefetch: int = 2  # prefetch depths 1..max_prefetch are tried
    world: int = 1  # ranks sharing the streamed units

    def __post_init__(self) -> None:
        if self.max_prefetch < 1:
            raise ConfigError(f"prefetch={self.max_prefetch}: must be >= 1")


@dataclass(frozen=True)
class Prediction:
    batch: int
    gen_len: int
    prefill_s: float  # the first pass: every prompt token, and the first new token
    decode_s: float  # the other gen_len - 1 passes

    @property
    def step_s(self) -> float:
        return self.decode_s / max(1, self.gen_len - 1)

    @property
    def tok_s(self) -> float:
        """New tokens of all rows per second, as GenerationStats.tokens_per_s counts them."""
        return self.batch * self.gen_len / (self.prefill_s + self.decode_s)


def act_token_bytes(cfg: ModelConfig, itemsize: int) -> int:
    """Activation bytes of one token inside one unit: hidden states, residual, normed input,
    q/k/v, attention output (~8 x D) and the MLP's gate, up and product (3 x F per active
    expert)."""
    return (8 * cfg.hidden_size + 3 * cfg.intermediate_size * max(1, cfg.experts_per_token)) * (
        itemsize
    )


def workspace_bytes(cfg: ModelConfig, itemsize: int, tokens: int, rows: int = 256) -> int:
    """Device bytes for the activations of `tokens` tokens inside one unit, with a quarter more
    for the attention kernel's own workspace; plus float32 logits and sampling buffers for
    `rows` rows (at least 256)."""
    return int(1.25 * tokens * act_token_bytes(cfg, itemsize)) + 2 * max(256, rows) * (
        cfg.vocab_size * 4
    )


def _splits(rows: int, per: int) -> list[int]:
    """rows cut into parts of `per` (the last one shorter), as generate() cuts them."""
    return [per] * (rows // per) + ([rows % per] if rows % per else [])


def _compute_s(
    size: ModelSize, rates: Rates, rows: int, seq: int, ctx: np.ndarray | int
) -> np.ndarray | float:
    """Device seconds for one micro-batch of `rows` rows x `seq` new tokens over `ctx` visible
    positions (an array of contexts gives one time per context)."""
    flops = size.cost.pass_flops(rows, seq, ctx)
    hbm = (
        size.weight_bytes
        + size.kv_token_bytes * rows * ctx
        + ACT_TRAFFIC * act_token_bytes(size.cfg, size.itemsize) * rows * seq * size.cfg.num_layers
    )
    return flops / rates.flops + hbm / rates.hbm_bytes_per_s + len(size.units) * LAUNCH_S


def predict(
    plan: Plan,
    size: ModelSize,
    rates: Rates,
    work: Workload,
    batch: int,
    micro_batch: int | None = None,
) -> Prediction:
    """Seconds of a `batch`-row run under `plan`: decode in micro-batches of `micro_batch` rows
    (None: all at once), the prefill in chunks of work.prefill_tokens tokens."""
    p, g = work.prompt_len, work.gen_len
    stream = plan.rank_streamed_bytes / rates.stream_bytes_per_s(plan.offload)
    share = plan.streamed_bytes / max(1, size.weight_bytes)

    def pass_s(compute: np.ndarray | float) -> np.ndarray | float:
        over = np.maximum(stream, compute)
        if plan.prefetch == 1:
            over = np.maximum(stream + share * compute, compute)
        return over + PASS_OVERHEAD_S

    chunk = max(1, work.prefill_tokens // p)
    prefill = pass_s(sum(_compute_s(size, rates, r, p, p) for r in _splits(batch, chunk)))
    ctx = np.arange(p + 1, p + g)  # decode step i sees the prompt and i new tokens
    parts = _splits(batch, micro_batch or batch)
    decode = pass_s(sum(_compute_s(size, rates, r, 1, ctx) for r in parts))
    return Prediction(batch, g, float(prefill), float(np.sum(decode)))


def with_prediction(plan: Plan, pred: Prediction) -> Plan:
    return dataclasses.replace(
        plan,
        predicted_prefill_s=pred.prefill_s,
        predicted_step_s=pred.step_s,
        predicted_tok_s=pred.tok_s,
    )


def batch_grid(max_batch: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, ... (powers of two and 1.5 x them) up to max_batch, and it."""
    grid = sorted({m << s for s in range(max_batch.bit_length()) for m in (2, 3)} | {1})
    return [b for b in grid if b < max_batch] + [max_batch]


def _fit(
    size: ModelSize, work: Workload, budgets: Budgets, device: str, batch: int, micro: int,
    depth: int, kv_tier: str,
) -> Plan:  # fmt: skip
    """make_plan for the weights' share of the budget: what `batch` rows in micro-batches of
    `micro` rows (a divisor of `batch`) leave after their KV cache and activation workspace.
    PlanError if nothing fits the GPU or the CPU budget."""
    p = work.prompt_len
    tokens = max(min(batch, max(1, work.prefill_tokens // p)) * p, micro)  # [rows, tokens]
    ws = workspace_bytes(size.cfg, size.itemsize, tokens, rows=batch)
    kv = batch * (p + work.gen_len) * size.kv_token_bytes if kv_tier == "gpu" else 0
    plan = make_plan(
        list(size.units), budgets.gpu, budgets.offload, depth, device, world=budgets.world,
        workspace=ws, kv_bytes=kv,
    )  # fmt: skip
    if budgets.offload == "cpu" and budgets.cpu is not None and plan.streamed_bytes > budgets.cpu:
        raise PlanError(
            f"cpu_memory {fmt_bytes(budgets.cpu)} cannot hold the "
            f"{fmt_bytes(plan.streamed_bytes)} of streamed units that gpu_memory "
            f"{fmt_bytes(budgets.gpu)} leaves for batch {batch}; raise cpu_memory or "
            "gpu_memory, or use offload='nvme'"
        )
    return dataclasses.replace(plan, kv_tier=kv_tier, micro_batch=micro,
                               micro_batches=batch // micro)  # fmt: skip


def choose_plan(
    size: ModelSize,
    rates: Rates,
    work: Workload,
    budgets: Budgets,
    device: str,
    batch: int | None = None,
) -> Plan:
    """The plan with the most predicted tokens/s (ties: fewer rows, micro-batches and slots)
    for `batch` rows, or for the best batch up to work.max_batch when None. PlanError naming
    the numbers when not even one row fits."""
    best: tuple[tuple[float, ...], Plan] | None = None
    first_error: PlanError | None = None
    for kv_tier in KV_TIERS:
        for depth in range(1, budgets.max_prefetch + 1):
            for b in [batch] if batch else batch_grid(work.max_batch):
                fitted = False
                for n in (m for m in MICRO_BATCHES if b % m == 0):  # equal micro-batches
                    micro = b // n
                    try:
                        plan = _fit(size, work, budgets, device, b, micro, depth, kv_tier)
                    except PlanError as e:
                        first_error = first_error or e
                        continue
                    fitted = True
                    pred = predict(plan, size, rates, work, b, micro)
                    key = (pred.tok_s, -b, -plan.micro_batches, -depth)
                    if best is None or key > best[0]:
                        best = (key, with_prediction(plan, pred))
                if not fitted:
                    break  # more rows only need more memory
    if best is None:
        assert first_error is not None
        rows = batch or 1
        raise PlanError(
            f"{first_error} (for {rows} row(s) of {work.prompt_len} prompt + {work.gen_len} new "
            f"tokens, KV cache {fmt_bytes(size.kv_token_bytes)} per token)"
        )
    return dataclasses.replace(best[1], h2d_bytes_per_s=rates.h2d_bytes_per_s)
