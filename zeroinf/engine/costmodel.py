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
                + quantized weights written in 16 bits and read back where tokens_k exceeds
                  the fused kernel's rows (dequant_bytes)
    overlap   = max(stream, compute) with two or more slots (the copy of unit j+1 runs while j
                computes); max(stream + f x compute, compute) with one slot, f = the streamed
                share of the weight bytes (a streamed unit's copy waits for the previous one's
                compute to free the slot).

With the KV cache of some layers in host memory (KV tiers "cpu" and "split",
models/host_attention.py) a decode micro-batch has no KV read and no attention FLOPs on the
device for those layers; instead the device waits in each of them for the host: q, k, v to the
host (D2H), attention over the cached keys on the CPU, the output back (H2D), plus HOST_LAYER_S
of syncs and launches. The executor issues micro-batches one after the other and the host's
attention sits in the compute stream (a host function there, on a GPU), so it overlaps neither
the device's compute nor the other micro-batches; the copy stream keeps prefetching weights
meanwhile, into free slots only. So such a pass is modelled unit by unit (_in_order_s): each
unit computes its share of the device's work plus, for a host layer, its attention (KV bytes /
the CPU attention rate), once its copy is in; each copy waits for its slot. The CPU attention
and H2D run at the rates the probe measured with the two beside each other. Both read host
memory, so a pass also takes at least (cache bytes read and written + streamed bytes) / the
probe's host memory rate (measured with the CPU reading and H2D running at once), the
roofline's term too. A prefill at the cache's start attends on the device (its keys are its
own) and only sends its keys and values to the host, beside the compute.

Rates come from probe.py (measured on this machine, cached). The search tries every KV tier
(plan.KV_TIERS; search_tiers), prefetch depth, batch and micro-batch count and keeps the most
predicted tokens/s; each candidate's resident set is make_plan's for the budget left after its
device KV cache and activation workspace, and its pinned units and host KV cache must fit the
CPU and host budgets, so a chosen plan never accounts for more than a budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kernels.qmatmul import FUSED_MAX_ROWS
from zeroinf.engine.gather import gathered_bytes
from zeroinf.engine.kvcache import kv_token_bytes
from zeroinf.engine.plan import KV_TIERS, STREAMED_TIERS, Plan, layer_index, make_plan
from zeroinf.engine.probe import Rates
from zeroinf.engine.roofline import ModelCost
from zeroinf.errors import ConfigError, PlanError
from zeroinf.format import DTYPES, Checkpoint, padded_size
from zeroinf.models import ModelConfig
from zeroinf.sizes import fmt_bytes

PASS_OVERHEAD_S = 1e-3  # per forward pass: sampling, the host's sync, Python around the loop
LAUNCH_S = 20e-6  # per unit and micro-batch: kernel launches the device waits on when idle
ACT_TRAFFIC = 2.0  # each activation byte is written once and read once per layer
# Per layer and micro-batch with the host KV tier: the host sync on q/k/v, the copies' launches
# and the Python around them (a guess of the right order; bench reports the prediction error).
HOST_LAYER_S = 100e-6
# The native kernel's cache read rate inside a decode run, as a share of the probe's (the kernel
# timed beside H2D over 4 GiB of cache): 0.82-0.95, mean 0.88, over six OPT-30B batch-96 runs of
# the "cpu" tier (docs/benchmarks.md, runs 18-23, nvidia-h100-x1, 2026-11-24), fitted on them
# (their errors there are the code's before this share; out of sample, runs 24-25: +14.0% and
# +27.7%, the second's kernel at 0.79 of the probe's rate). Queued in a CUDA stream as in a run,
# the kernel read as fast as called directly (stage hattns, same day). Over a decode step's whole
# 72 GB of cache it read 0.82-0.92 of its rate over 6 GB (stage hattnfp, two machines, same day):
# the footprint, which the probe's 4 GiB does not have, is where the share comes from.
HOST_ATTN_IN_RUN = 0.88
MICRO_BATCHES = (1, 2, 4, 8)  # micro-batch counts tried


@dataclass(frozen=True)
class ModelSize:
    """What the cost model needs to know about a checkpoint."""

    units: tuple[tuple[str, int], ...]  # (unit name, bytes) in execution order
    cost: ModelCost  # FLOPs of a pass (roofline.py)
    cfg: ModelConfig  # activation sizes
    itemsize: int  # bytes of the weights' dtype (activations have it too)
    kv_token_bytes: int  # K + V over all layers for one token of one row (kvcache.py)
    kv_dtype: str | None = None  # the cache's storage (kvcache.KV_DTYPES): sets the CPU rate
    # (unit, bytes of its table that can stay on the host): make_plan's `gathered` (gather.py)
    gathered: tuple[tuple[str, int], ...] = ()

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
            kv_dtype,
            tuple(gathered_bytes(ckpt).items()),
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

    @property
    def prefill_rows(self) -> int:
        """Rows per prefill chunk, as the executor cuts the prefill."""
        return max(1, self.prefill_tokens // self.prompt_len)

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
    # Host memory free for this run (autoplan: what the host has available, on a GPU machine):
    # pinned streamed units plus a host KV cache must fit. None: unknown, and the host KV tier
    # is then searched only when asked for (choose_plan's kv_tiers), without a host cap.
    host: int | None = None

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


def carried_bytes(size: ModelSize, batch: int, work: Workload) -> int:
    """Device bytes of the prefill's other chunks' hidden states [rows, P, hidden], which wait
    on the device while a unit serves each chunk in turn (Executor.forward keeps every chunk's
    output between units): beyond the workspace's one chunk. OPT-30B's batch 192 at P = 512:
    1.3 GiB, which the 24 GiB plan of the int8 host tier had not counted (peak 26.5 GB)."""
    waiting = max(0, batch - work.prefill_rows)
    return waiting * work.prompt_len * size.cfg.hidden_size * size.itemsize


def _splits(rows: int, per: int) -> list[int]:
    """rows cut into parts of `per` (the last one shorter), as generate() cuts them."""
    return [per] * (rows // per) + ([rows % per] if rows % per else [])


def dequant_bytes(size: ModelSize, tokens: int) -> int:
    """Device bytes a pass of `tokens` tokens per matmul moves to dequantize its quantized
    weights: beyond FUSED_MAX_ROWS rows kernels/qmatmul.py writes each weight in 16 bits into
    a workspace and cuBLAS reads it back (the quantized bytes are read as weight_bytes), once
    per micro-batch or prefill chunk. OPT-30B int4 + int8 KV at batch 32 (q30kv, 8 chunks of
    2048 tokens): 0.31 s of its prefill, which had been predicted 1.47 s against 1.92-1.97
    measured (docs/benchmarks.md, nvidia-h100-x1, 2026-11-25)."""
    if tokens <= FUSED_MAX_ROWS:
        return 0  # the fused kernel expands the codes in registers
    return 2 * size.itemsize * size.cost.quantized_params


def _compute_s(
    size: ModelSize, rates: Rates, rows: int, seq: int, ctx: np.ndarray | int
) -> np.ndarray | float:
    """Device seconds for one micro-batch of `rows` rows x `seq` new tokens over `ctx` visible
    positions (an array of contexts gives one time per context)."""
    flops = size.cost.pass_flops(rows, seq, ctx)
    hbm = (
        size.weight_bytes
        + dequant_bytes(size, rows * seq)
        + size.kv_token_bytes * rows * ctx
        + ACT_TRAFFIC * act_token_bytes(size.cfg, size.itemsize) * rows * seq * size.cfg.num_layers
    )
    return flops / rates.flops + hbm / rates.hbm_bytes_per_s + len(size.units) * LAUNCH_S


def _host_device_s(
    size: ModelSize, rates: Rates, rows: int, ctx: np.ndarray | int, host_share: float
) -> np.ndarray | float:
    """Device-side seconds of one decode micro-batch with `host_share` of the layers' caches in
    host memory: the device's compute without those layers' KV reads and attention FLOPs, and
    per host layer the copies of q, k, v down and the output up, and HOST_LAYER_S."""
    cfg = size.cfg
    act = ACT_TRAFFIC * act_token_bytes(cfg, size.itemsize) * rows * cfg.num_layers
    attn_flops = size.cost.pass_flops(rows, 1, ctx) - size.cost.pass_flops(rows, 1, 0)
    device_kv = size.kv_token_bytes * rows * ctx * (1 - host_share)  # the device layers' cache
    device = (
        (size.cost.pass_flops(rows, 1, 0) + attn_flops * (1 - host_share)) / rates.flops
        + (size.weight_bytes + dequant_bytes(size, rows) + act + device_kv) / rates.hbm_bytes_per_s
        + len(size.units) * LAUNCH_S
    )
    host_layers = cfg.num_layers * host_share
    vec = rows * host_layers * cfg.head_dim * size.itemsize  # one head's vector, host layers
    copies = vec * (cfg.num_heads + 2 * cfg.num_kv_heads) / rates.d2h_bytes_per_s + (
        vec * cfg.num_heads / rates.h2d_bytes_per_s
    )  # q, k, v down; o up
    return device + copies + host_layers * HOST_LAYER_S


def _in_order_s(
    compute: list[np.ndarray | float], copy: list[float | None], slots: int
) -> np.ndarray | float:
    """Seconds of a pass that computes its units in order (compute[i] each) while the copy
    stream brings its streamed units in (copy[i] each, None: resident) through `slots` device
    slots: a unit computes once the one before it has and its copy is in; a copy starts once
    the copy before it is done and its slot is free (the unit `slots` streamed units earlier
    has computed). Where the host's attention holds the compute stream, the copies can run
    ahead by `slots` units only, so a run of streamed layers waits for them."""
    done: np.ndarray | float = 0.0
    copied: np.ndarray | float = 0.0
    computed: list[np.ndarray | float] = []  # per streamed unit, when its slot frees
    for c, cp in zip(compute, copy, strict=True):
        if cp is not None:
            free = computed[-slots] if len(computed) >= slots else 0.0
            copied = np.maximum(copied, free) + cp
            done = np.maximum(done, copied)
        done = done + c
        if cp is not None:
            computed.append(done)
    return done


def _beside_rates(cpu_rate: float, link_rate: float, rates: Rates) -> tuple[float, float]:
    """The host attention's and the link's rates beside each other (each slows the other: the
    probe measures both at once), where the probe has them; else their own rates. The two share
    host memory: what the attention leaves of the probe's total the link may take, up to its own
    rate. The probe keeps the window with the best attention rate, where the link's share is
    smallest; inside a run the attention reads HOST_ATTN_IN_RUN of that rate and the link took
    what it left (run 68: the probe's window 100.0 + 34.4 GB/s, the run's kernel 89.5 and
    stream 45.0: the model's 88.0 and 46.4 with this rule, 34.4 without it, -20.8% predicted)."""
    if rates.cpu_attn_h2d_bytes_per_s and rates.h2d_cpu_attn_bytes_per_s:
        total = rates.cpu_attn_h2d_bytes_per_s + rates.h2d_cpu_attn_bytes_per_s
        cpu_rate *= min(1.0, rates.cpu_attn_h2d_bytes_per_s / rates.cpu_attn_bytes_per_s)
        beside = link_rate * min(1.0, rates.h2d_cpu_attn_bytes_per_s / rates.h2d_bytes_per_s)
        link_rate = min(link_rate, max(beside, total - cpu_rate))
    return cpu_rate, link_rate


def _host_prefill_s(size: ModelSize, host_share: float) -> float:
    """What a prefill chunk's host layers add on the device's path: HOST_LAYER_S each. Their keys
    and values go down on a side stream, beside the device's compute: by the copy engine straight
    into a pinned cache, else into the cache from the writer thread (predict counts the D2H as a
    floor of the pass; the thread wrote OPT-30B's 67.6 GB at batch 96 in 3.3 s against 5.2 s of
    prefill on the H100 machine, 2026-11-24)."""
    return size.cfg.num_layers * host_share * HOST_LAYER_S


def _cpu_attn_rate(size: ModelSize, rates: Rates) -> float:
    """Cache bytes/s that host attention reads inside a run: the probe's rate (over an int8
    cache for an int8 one) times HOST_ATTN_IN_RUN. Both run the native kernel where it is
    built (int8 since the eleventh session: before, torch's path, which the probe timed too)."""
    probed = rates.cpu_attn_bytes_per_s
    if size.kv_dtype == "int8" and rates.cpu_attn_int8_bytes_per_s:
        probed = rates.cpu_attn_int8_bytes_per_s
    return probed * HOST_ATTN_IN_RUN


def predict(
    plan: Plan,
    size: ModelSize,
    rates: Rates,
    work: Workload,
    batch: int,
    micro_batch: int | None = None,
) -> Prediction:
    """Seconds of a `batch`-row run under `plan`: decode in micro-batches of `micro_batch` rows
    (None: all at once), the prefill in chunks of work.prefill_tokens tokens, the KV cache in
    plan.kv_tier."""
    p, g = work.prompt_len, work.gen_len
    link_rate = rates.stream_bytes_per_s(plan.offload)
    stream = plan.rank_streamed_bytes / link_rate
    share = plan.streamed_bytes / max(1, size.weight_bytes)
    layers = size.cfg.num_layers
    host_layers = plan.kv_host_layers(layers)
    host_share = len(host_layers) / layers  # of the cache, in host memory
    host_rate = rates.host_memory_bytes_per_s if host_share else None

    def pass_s(
        compute: np.ndarray | float, positions: np.ndarray | int, link: np.ndarray | float = stream
    ) -> np.ndarray | float:
        """A pass of `compute` device seconds whose copies take `link` seconds, and whose host KV
        tier moves `positions` positions of every row's cache through host memory (read or
        written)."""
        over = np.maximum(link, compute)
        if plan.prefetch == 1:
            over = np.maximum(link + share * compute, compute)
        if host_rate:  # the cache's and the streamed weights' bytes share host memory
            cache = size.kv_token_bytes * host_share * batch * positions
            over = np.maximum(over, (cache + plan.rank_streamed_bytes) / host_rate)
        return over + PASS_OVERHEAD_S

    def prefill_s(rows: int) -> float:
        extra = _host_prefill_s(size, host_share) if host_share else 0.0
        return _compute_s(size, rates, rows, p, p) + extra

    prefill_compute = sum(prefill_s(r) for r in _splits(batch, work.prefill_rows))
    if host_share:  # the prompt's keys and values go down beside the compute (a side stream)
        down = size.cost.kv_bytes(batch, p) * host_share / rates.d2h_bytes_per_s
        prefill_compute = max(prefill_compute, down)
    prefill = pass_s(prefill_compute, p)  # p written
    ctx = np.arange(p + 1, p + g)  # decode step i sees the prompt and i new tokens
    parts = _splits(batch, micro_batch or batch)
    if not host_share:
        decode = pass_s(sum(_compute_s(size, rates, r, 1, ctx) for r in parts), ctx + 1)
    else:
        # The device waits for each host layer's attention (in its stream: docs/planner.md)
        # while the copy stream brings the streamed units in: unit by unit (_in_order_s), each
        # unit its share of the device's work and, for a layer whose cache is in host memory,
        # its attention, at the rates the probe measured with the two beside each other.
        device = sum(_host_device_s(size, rates, r, ctx, host_share) for r in parts)
        cpu_rate, link_rate = _beside_rates(_cpu_attn_rate(size, rates), link_rate, rates)
        attention = size.kv_token_bytes // layers * batch * ctx / cpu_rate  # one host layer's
        compute, copy = [], []
        for pl in plan.placements:
            own = device * pl.nbytes / size.weight_bytes
            compute.append(own + attention if layer_index(pl.unit) in host_layers else own)
            streamed = pl.tier in STREAMED_TIERS
            copy.append(padded_size(pl.nbytes, plan.world) / plan.world / link_rate if streamed
                        else None)  # fmt: skip
        decode = pass_s(_in_order_s(compute, copy, plan.prefetch), ctx + 1, 0.0)
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
    depth: int, kv_tier: str, device_layers: int = 0,
) -> Plan:  # fmt: skip
    """make_plan for the weights' share of the budget: what `batch` rows in micro-batches of
    `micro` rows (a divisor of `batch`) leave after their KV cache (on the device for the "gpu"
    tier, and for `device_layers` layers of the "split" tier) and activation workspace.
    PlanError if nothing fits the GPU, the CPU or the host budget."""
    p = work.prompt_len
    tokens = max(min(batch, work.prefill_rows) * p, micro)  # [rows, tokens]
    ws = workspace_bytes(size.cfg, size.itemsize, tokens, rows=batch)
    ws += carried_bytes(size, batch, work)
    layers = size.cfg.num_layers
    kv = batch * (p + work.gen_len) * size.kv_token_bytes
    on_device = {"gpu": layers, "cpu": 0, "split": device_layers}[kv_tier]
    device_kv = kv // layers * on_device
    plan = make_plan(
        list(size.units), budgets.gpu, budgets.offload, depth, device, world=budgets.world,
        workspace=ws, kv_bytes=device_kv, gathered=dict(size.gathered),
    )  # fmt: skip
    host_kv = kv - device_kv
    pinned = plan.host_unit_bytes(per_rank=False)  # host memory besides the KV cache
    if budgets.cpu is not None and pinned + host_kv > budgets.cpu:
        what = f"{fmt_bytes(pinned)} of streamed units that gpu_memory {fmt_bytes(budgets.gpu)} "
        what += f"leaves for batch {batch}"
        if host_kv:
            what += f" and its {fmt_bytes(host_kv)} host KV cache"
        raise PlanError(
            f"cpu_memory {fmt_bytes(budgets.cpu)} cannot hold the {what}; raise cpu_memory or "
            "gpu_memory, or use offload='nvme'"
        )
    host_need = plan.host_unit_bytes(per_rank=True) + host_kv
    if budgets.host is not None and host_need > budgets.host:
        raise PlanError(
            f"host memory: {fmt_bytes(budgets.host)} available cannot hold "
            f"{fmt_bytes(host_need)} (pinned streamed units and the host KV cache of batch "
            f"{batch})"
        )
    split = kv_tier == "split"
    return dataclasses.replace(
        plan, kv_tier=kv_tier, kv_host_bytes=host_kv, micro_batch=micro,
        micro_batches=batch // micro,
        kv_device_layers=device_kv_layers(plan, layers, on_device) if split else (),
    )  # fmt: skip


def device_kv_layers(plan: Plan, layers: int, n: int) -> tuple[int, ...]:
    """The `n` layers whose cache the "split" tier keeps on the device: streamed layers first,
    spread evenly over them (a streamed layer whose attention stays on the device gives the
    link a layer's time with the CPU idle, balancing the two through the pass), then resident
    ones, spread the same way."""
    streamed = [i for p in plan.streamed if (i := layer_index(p.unit)) is not None]
    rest = sorted(set(range(layers)) - set(streamed))
    chosen: list[int] = []
    for pool in (streamed, rest):
        k = min(n - len(chosen), len(pool))
        chosen += [pool[(2 * j + 1) * len(pool) // (2 * k)] for j in range(k)]
    return tuple(sorted(chosen))


def search_tiers(budgets: Budgets, kv_tiers: tuple[str, ...] | None) -> tuple[str, ...]:
    """The KV tiers a search tries: the given ones (ConfigError for an unknown one), else every
    tier, the host one only where the host's memory is known (Budgets.host)."""
    if kv_tiers is None:
        return KV_TIERS if budgets.host is not None else ("gpu",)
    for t in kv_tiers:
        if t not in KV_TIERS:
            raise ConfigError(
                f"kv_tier={t!r}: use one of {', '.join(KV_TIERS)} (None: the planner's)"
            )
    return kv_tiers


def _depths(kv_tier: str, max_prefetch: int) -> list[list[int]]:
    """Prefetch depths to try, in rounds: a later round only when no plan fitted in the earlier
    ones. With the host KV tier, one slot is tried only when two or more do not fit: the device
    then idles on the host's attention and on the next unit's copy in turn, which the one-slot
    formula above understates. On the H100 machine (OPT-30B fp16, 24 GiB, batch 96, 2026-11-24)
    one slot gave 1.94 s per decode step, predicted 1.79; two slots 1.61, though the model
    ranked one slot first."""
    if kv_tier != "gpu" and max_prefetch >= 2:
        return [list(range(2, max_prefetch + 1)), [1]]
    return [list(range(1, max_prefetch + 1))]


def _candidates(
    size: ModelSize, rates: Rates, work: Workload, budgets: Budgets, device: str,
    batch: int | None, kv_tier: str, depth: int, errors: list[PlanError],
) -> Iterator[tuple[tuple[float, ...], Plan]]:  # fmt: skip
    """(ranking key, plan with its prediction) of every batch (`batch`, or the grid up to
    work.max_batch) and equal micro-batch count that fits with this KV tier and prefetch depth;
    what does not fit goes to `errors`. Key: predicted tokens/s, then fewer rows, micro-batches
    and slots."""
    counts = _device_layer_counts(kv_tier, size.cfg.num_layers)
    if not counts:
        errors.append(PlanError("kv_tier='split' needs a model of two or more layers"))
    for b in [batch] if batch else batch_grid(work.max_batch):
        fitted = False
        for n in (m for m in MICRO_BATCHES if b % m == 0):  # equal micro-batches
            micro = b // n
            for on_device in counts:
                try:
                    plan = _fit(size, work, budgets, device, b, micro, depth, kv_tier, on_device)
                except PlanError as e:
                    errors.append(e)
                    continue
                fitted = True
                pred = predict(plan, size, rates, work, b, micro)
                key = (pred.tok_s, -b, -plan.micro_batches, -depth, -on_device)
                yield key, with_prediction(plan, pred)
        if not fitted:
            break  # more rows only need more memory


def _device_layer_counts(kv_tier: str, layers: int) -> list[int]:
    """Layers with their cache on the device that a search tries: for the "split" tier, about
    every sixteenth of the layers up to three quarters (each costs the weights' share of the
    budget a layer's cache takes); none else (_fit knows the other tiers' placement)."""
    if kv_tier != "split":
        return [0]
    return sorted({n for f in range(1, 13) if 0 < (n := round(layers * f / 16)) < layers})


def choose_plan(
    size: ModelSize,
    rates: Rates,
    work: Workload,
    budgets: Budgets,
    device: str,
    batch: int | None = None,
    kv_tiers: tuple[str, ...] | None = None,
) -> Plan:
    """The plan with the most predicted tokens/s (ties: fewer rows, micro-batches and slots, the
    device KV tier) for `batch` rows, or for the best batch up to work.max_batch when None, over
    the KV tiers of search_tiers. PlanError naming the numbers when not even one row fits."""
    best: tuple[tuple[float, ...], Plan] | None = None
    errors: list[PlanError] = []
    for kv_tier in search_tiers(budgets, kv_tiers):
        for depths in _depths(kv_tier, budgets.max_prefetch):
            found = [
                c
                for depth in depths
                for c in _candidates(
                    size, rates, work, budgets, device, batch, kv_tier, depth, errors
                )
            ]
            for key, plan in found:
                if best is None or key > best[0]:  # strict: the first tier (gpu) wins ties
                    best = (key, plan)
            if found:
                break  # a later round of depths only where none of these fitted
    if best is None:
        assert errors
        rows = batch or 1
        raise PlanError(
            f"{errors[0]} (for {rows} row(s) of {work.prompt_len} prompt + {work.gen_len} new "
            f"tokens, KV cache {fmt_bytes(size.kv_token_bytes)} per token)"
        )
    return dataclasses.replace(best[1], h2d_bytes_per_s=rates.h2d_bytes_per_s)
