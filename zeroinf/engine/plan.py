"""Which units stay on the device and which stream, from where: a pure function of sizes and
budgets, printed for the user and checked so that the run cannot exceed what it predicts."""

from __future__ import annotations

from dataclasses import dataclass

from zeroinf.errors import PlanError
from zeroinf.format import padded_size
from zeroinf.sizes import fmt_bytes

TIERS = ("gpu", "host", "cpu", "nvme")
STREAMED_TIERS = ("cpu", "nvme")
# Where the KV cache can live: "gpu", on the compute device; "cpu", in host memory with each
# layer's attention run on the CPU (models/host_attention.py; its cost: costmodel.py); "split",
# the layers of Plan.kv_device_layers on the device and the others in host memory (the planner
# balances the CPU's attention against the link's copies with it: docs/planner.md).
KV_TIERS = ("gpu", "cpu", "split")


@dataclass(frozen=True)
class Placement:
    unit: str
    nbytes: int
    # "gpu": resident on the device; "cpu": pinned host memory; "nvme": unit file; "host": the
    # embed unit whose token table stays in host memory, its rows gathered there
    # (engine/gather.py), its other tensors resident
    tier: str
    host_only: int = 0  # bytes of the unit that never reach the device ("host" tier)

    @property
    def device_bytes(self) -> int:
        """Bytes this unit keeps on the device for the whole run (0 for a streamed unit)."""
        return self.nbytes - self.host_only if self.tier in ("gpu", "host") else 0


@dataclass(frozen=True)
class Plan:
    device: str
    offload: str  # where streamed units live: "cpu" | "nvme"
    placements: tuple[Placement, ...]  # execution order
    prefetch: int  # number of device slots for streamed units
    gpu_budget: int  # bytes for resident units plus slots
    h2d_bytes_per_s: float | None = None  # measured at load when a GPU is present
    world: int = 1  # ranks sharing the streamed units (each holds and copies 1/world of them)
    workspace: int = 0  # device bytes of the budget kept free for activations
    # Set by the cost model (costmodel.py) when it sizes the batch; gpu_budget then also holds
    # the KV cache of `batch` rows.
    kv_bytes: int = 0  # device bytes of the KV cache counted in gpu_budget
    kv_tier: str = "gpu"  # one of KV_TIERS
    kv_host_bytes: int = 0  # host bytes of a "cpu" or "split" KV cache (0: none, or not planned)
    kv_device_layers: tuple[int, ...] = ()  # "split": the layers whose cache is on the device
    micro_batch: int | None = None  # decode rows per micro-batch; None: not planned
    micro_batches: int = 1
    predicted_prefill_s: float | None = None
    predicted_step_s: float | None = None  # mean decode step
    predicted_tok_s: float | None = None  # new tokens of all rows / (prefill + decode)

    def __post_init__(self) -> None:
        if self.offload not in ("cpu", "nvme"):
            raise PlanError(f"offload={self.offload!r}: must be 'cpu' or 'nvme'")
        if self.prefetch < 1:
            raise PlanError(f"prefetch={self.prefetch}: must be >= 1")
        if self.kv_tier not in KV_TIERS:
            raise PlanError(f"kv_tier={self.kv_tier!r}: must be one of {', '.join(KV_TIERS)}")
        if self.kv_tier == "cpu" and self.kv_bytes or self.kv_tier == "gpu" and self.kv_host_bytes:
            raise PlanError(
                f"kv_tier={self.kv_tier!r} with kv_bytes={self.kv_bytes}, kv_host_bytes="
                f"{self.kv_host_bytes}: a KV cache lives on one side only"
            )
        if (self.kv_tier == "split") != bool(self.kv_device_layers):
            raise PlanError(
                f"kv_tier={self.kv_tier!r} with kv_device_layers={self.kv_device_layers}: the "
                "'split' tier, and only it, names the layers whose cache is on the device"
            )
        if self.micro_batch is not None and self.micro_batch < 1 or self.micro_batches < 1:
            raise PlanError(
                f"micro_batch={self.micro_batch}, micro_batches={self.micro_batches}: must be >= 1"
            )

    def kv_host_layers(self, num_layers: int) -> frozenset[int]:
        """The layers whose KV cache lives in host memory (attention on the CPU)."""
        if self.kv_tier == "gpu":
            return frozenset()
        return frozenset(range(num_layers)) - set(self.kv_device_layers)

    @property
    def batch(self) -> int | None:
        """Rows the plan serves (None when no batch was planned)."""
        return self.micro_batch * self.micro_batches if self.micro_batch else None

    @property
    def streamed(self) -> tuple[Placement, ...]:
        return tuple(p for p in self.placements if p.tier in STREAMED_TIERS)

    @property
    def resident_bytes(self) -> int:
        return sum(p.device_bytes for p in self.placements)

    @property
    def host_tier_bytes(self) -> int:
        """Bytes of units gathered on the host, held whole in host memory by every rank."""
        return sum(p.nbytes for p in self.placements if p.tier == "host")

    def host_unit_bytes(self, per_rank: bool) -> int:
        """Host memory for units: the CPU tier (one rank's share of it, or all of it) and the
        units gathered on the host. A host KV cache (kv_host_bytes) comes on top."""
        cpu = self.rank_streamed_bytes if per_rank else self.streamed_bytes
        return (cpu if self.offload == "cpu" else 0) + self.host_tier_bytes

    @property
    def streamed_bytes(self) -> int:
        """Bytes that cross PCIe in every forward pass."""
        return sum(p.nbytes for p in self.streamed)

    @property
    def slot_bytes(self) -> int:
        return max((p.nbytes for p in self.streamed), default=0)

    @property
    def slots(self) -> int:
        return self.prefetch if self.streamed else 0

    @property
    def gpu_weight_bytes(self) -> int:
        """Device bytes for weights: resident units plus the streaming slots."""
        return self.resident_bytes + self.slots * self.slot_bytes

    @property
    def gpu_bytes(self) -> int:
        """Device bytes the plan accounts for: weights, slots, activations and KV cache."""
        return self.gpu_weight_bytes + self.workspace + self.kv_bytes

    @property
    def rank_streamed_bytes(self) -> int:
        """Bytes of streamed units that one rank holds on the host and copies per pass."""
        return sum(padded_size(p.nbytes, self.world) // self.world for p in self.streamed)

    @property
    def predicted_pass_s(self) -> float | None:
        """Transfer time of one forward pass (the decode step's floor when transfer-bound)."""
        if not self.h2d_bytes_per_s:
            return None
        return self.rank_streamed_bytes / self.h2d_bytes_per_s

    def __str__(self) -> str:
        res = [p.unit for p in self.placements if p.tier == "gpu"]
        hosted = [p.unit for p in self.placements if p.tier == "host"]
        lines = [
            f"zeroinf plan on {self.device}: {len(res)}/{len(self.placements)} units resident"
            + (f", {len(hosted)} gathered on the host" if hosted else "")
            + f" ({fmt_bytes(self.resident_bytes)} on the device), {len(self.streamed)} streamed "
            f"from {self.offload} ({fmt_bytes(self.streamed_bytes)} per forward pass)",
            f"  device weights {fmt_bytes(self.gpu_weight_bytes)} of budget "
            f"{fmt_bytes(self.gpu_budget)}: {self.slots} slot(s) x {fmt_bytes(self.slot_bytes)}"
            + (f", {fmt_bytes(self.workspace)} kept for activations" if self.workspace else "")
            + (f", {fmt_bytes(self.kv_bytes)} KV cache" if self.kv_bytes else ""),
            f"  resident: {_ranges(res) or '-'}",
            *(
                f"  {p.unit}: {fmt_bytes(p.host_only)} table kept in host memory, its rows "
                f"gathered there ({fmt_bytes(p.device_bytes)} on the device)"
                for p in self.placements
                if p.tier == "host"
            ),
            *(
                [
                    f"  {self.world} ranks: each holds and copies "
                    f"{fmt_bytes(self.rank_streamed_bytes)} of the streamed units per pass"
                ]
                if self.world > 1
                else []
            ),  # fmt: skip
            f"  streamed: {_ranges([p.unit for p in self.streamed]) or '-'}",
        ]
        if self.predicted_pass_s is not None:
            lines.append(
                f"  predicted transfer per forward pass: {self.predicted_pass_s * 1e3:.1f} ms "
                f"at {self.h2d_bytes_per_s / 1e9:.1f} GB/s H2D"
            )
        if self.micro_batch:
            lines.append(
                f"  batch {self.batch} = {self.micro_batches} micro-batch(es) x "
                f"{self.micro_batch} rows, KV cache on {self.kv_tier}, prefetch {self.prefetch}"
            )
        if self.kv_tier != "gpu":
            lines.append(
                "  KV cache in host memory"
                + (f" ({fmt_bytes(self.kv_host_bytes)})" if self.kv_host_bytes else "")
                + ", attention on the CPU"
                + (
                    f"; the cache of layers {', '.join(map(str, self.kv_device_layers))} on the "
                    f"device ({fmt_bytes(self.kv_bytes)})"
                    if self.kv_device_layers
                    else ""
                )
            )
        if self.predicted_tok_s is not None:
            lines.append(
                f"  predicted: prefill {self.predicted_prefill_s:.3g} s, decode step "
                f"{self.predicted_step_s * 1e3:.3g} ms, {self.predicted_tok_s:.4g} tok/s"
            )
        return "\n".join(lines)


def layer_index(unit: str) -> int | None:
    """7 for the unit "layers.7"; None for any other unit (embed, head)."""
    return int(unit[7:]) if unit.startswith("layers.") else None


def _ranges(names: list[str]) -> str:
    """'embed, layers.0-3, layers.7, head': compact listing of unit names."""
    out: list[str] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            out.append(f"layers.{run[0]}" + (f"-{run[-1]}" if len(run) > 1 else ""))
            run.clear()

    for n in names:
        i = layer_index(n)
        if i is not None and (not run or i == run[-1] + 1):
            run.append(i)
        else:
            flush()
            if i is not None:
                run.append(i)
            else:
                out.append(n)
    flush()
    return ", ".join(out)


def _even(resident: set[int], size: list[int], host: dict[int, int]) -> set[int]:
    """`resident` with the members of each group of equal-sized units (a model's layers) moved
    to evenly spaced places in the group: the same bytes (and slot size), and the streamed
    units between two resident ones as few as can be. The bit-reversal order this replaced
    spread a prefix evenly only at powers of two: 18 of OPT-30B's 48 layers left runs of three,
    which two slots cannot hide when a layer computes for less than a copy takes (with the cache
    in host memory: ~17-22 ms of attention against ~24 ms of copy). The cost model predicts 4-6%
    off that step; runs with either layout still waited ~0.35 s per step for weights
    (docs/benchmarks.md, nvidia-h100-x1, 2026-11-24). The first member is resident: a step
    starts on it instead of waiting for its copy, which can only start as the last step ends
    (the slots hold its last units until then) while the device waits for the step's inputs."""
    groups: dict[int, list[int]] = {}
    for i, nb in enumerate(size):
        if i not in host:
            groups.setdefault(nb, []).append(i)
    out = set(resident)
    for members in groups.values():
        k = sum(i in resident for i in members)
        if 0 < k < len(members):
            out -= set(members)
            out |= {members[j * len(members) // k] for j in range(k)}
    return out


def make_plan(
    units: list[tuple[str, int]],
    gpu_budget: int,
    offload: str = "cpu",
    prefetch: int = 2,
    device: str = "cuda:0",
    h2d_bytes_per_s: float | None = None,
    world: int = 1,
    workspace: int = 0,
    kv_bytes: int = 0,
    gathered: dict[str, int] | None = None,
) -> Plan:
    """Keep units resident, largest saving first, while resident bytes plus `prefetch` slots
    (each as large as the largest unit still streamed) plus `workspace` and `kv_bytes` fit in
    `gpu_budget`.

    gathered: {unit: bytes of its table} for units whose table can stay on the host (the
    embed unit, engine/gather.py). When not everything fits on the device, such a unit may take
    the "host" tier: only its other bytes count against the budget, and it never streams. That
    plan is taken unless streaming the unit whole streams fewer bytes (its device part may
    cost a resident layer) or is the only one that fits."""
    fixed = workspace + kv_bytes
    variants = [{}]  # unit index -> bytes kept on the host
    if gathered and sum(nb for _, nb in units) + fixed > gpu_budget:
        variants.insert(0, {i: gathered[n] for i, (n, _) in enumerate(units) if n in gathered})
    fits, fails = [], []
    for host in variants:
        placements, need = _placements(units, gpu_budget, offload, prefetch, fixed, host)
        (fits if placements else fails).append((placements, need, host))
    if not fits:
        _, need, host = min(fails, key=lambda f: f[1])
        largest = max(nb - host.get(i, 0) for i, (_, nb) in enumerate(units) if i not in host)
        extra = f" plus {fmt_bytes(workspace)} for activations" if workspace else ""
        extra += f" plus {fmt_bytes(kv_bytes)} of KV cache" if kv_bytes else ""
        extra += "".join(
            f" plus {fmt_bytes(units[i][1] - kept)} of {units[i][0]}"
            for i, kept in host.items()
            if units[i][1] > kept
        )
        raise PlanError(
            f"gpu_memory {fmt_bytes(gpu_budget)} cannot hold {prefetch} streaming slot(s) of "
            f"{fmt_bytes(largest)} (the largest unit){extra}: need at least "
            f"{fmt_bytes(need)}; raise gpu_memory or lower prefetch"
        )
    placements = min(fits, key=lambda f: sum(p.nbytes for p in f[0] if p.tier == offload))[0]
    return Plan(
        device, offload, placements, prefetch, gpu_budget, h2d_bytes_per_s, world, workspace,
        kv_bytes,
    )  # fmt: skip


def _placements(
    units: list[tuple[str, int]], gpu_budget: int, offload: str, prefetch: int, fixed: int,
    host: dict[int, int],
) -> tuple[tuple[Placement, ...] | None, int]:  # fmt: skip
    """(placements, least budget any placement needs); placements None when none fits. Units
    in `host` keep those bytes on the host and the rest resident."""
    size = [nb - host.get(i, 0) for i, (_, nb) in enumerate(units)]  # device bytes if kept
    # largest first; which of equal-sized units stay resident is _even's choice
    order = sorted((i for i in range(len(units)) if i not in host), key=lambda i: -size[i])

    def need(resident: set[int]) -> int:
        streamed = [size[k] for k in order if k not in resident]
        slots = prefetch * max(streamed, default=0)
        return sum(size[k] for k in resident | host.keys()) + slots + fixed

    # The longest prefix of `order` that fits, then any smaller unit that still fits.
    for k in range(len(order), -1, -1):
        if need(set(order[:k])) <= gpu_budget:
            resident = set(order[:k])
            break
    else:
        return None, need(set())
    for i in order:
        if i not in resident and need(resident | {i}) <= gpu_budget:
            resident.add(i)
    resident = _even(resident, size, host)
    placements = tuple(
        Placement(name, nb, "host", host[i])
        if i in host
        else Placement(name, nb, "gpu" if i in resident else offload)
        for i, (name, nb) in enumerate(units)
    )
    return placements, need(set())
