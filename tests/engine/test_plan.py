"""The planner and the roofline arithmetic: pure functions, checked against hand counts."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zeroinf.convert import Quantization
from zeroinf.engine.plan import _ranges, make_plan
from zeroinf.engine.roofline import Machine, ModelCost, roofline_seconds
from zeroinf.errors import PlanError
from zeroinf.format import Manifest, TensorEntry, UnitEntry
from zeroinf.synthetic import SyntheticCheckpoint

UNITS = [("embed", 100), *[(f"layers.{i}", 300) for i in range(8)], ("head", 120)]


def test_everything_resident_when_it_fits() -> None:
    plan = make_plan(UNITS, gpu_budget=sum(n for _, n in UNITS), device="cpu")
    assert plan.streamed == () and plan.slots == 0 and plan.gpu_weight_bytes == 2620


def test_all_streamed_at_the_minimum_budget() -> None:
    plan = make_plan(UNITS, gpu_budget=2 * 300, prefetch=2, device="cpu")
    assert len(plan.streamed) == len(UNITS) and plan.gpu_weight_bytes == 600


def test_some_resident_fill_the_budget_without_exceeding_it() -> None:
    plan = make_plan(UNITS, gpu_budget=1500, prefetch=2, device="cpu")
    assert plan.gpu_weight_bytes <= 1500
    resident = [p.unit for p in plan.placements if p.tier == "gpu"]
    assert len(resident) == 3  # 3 x 300 + 2 x 300 slots = 1500
    # equal layers kept resident are spread out, not bunched together
    idx = sorted(int(u.split(".")[1]) for u in resident)
    assert all(b - a > 1 for a, b in zip(idx, idx[1:], strict=False)), idx


@pytest.mark.parametrize("layers", [8, 48])
def test_resident_layers_evenly_spaced(layers: int) -> None:
    """At every count that fits, k resident among n equal layers leave runs of streamed layers
    no longer than ceil(n / k) - 1 (18 of 48: runs of at most two, where the bit-reversal
    order left runs of three)."""
    units = [(f"layers.{i}", 300) for i in range(layers)]
    for k in range(1, layers - 2):  # k + 2 slots = n: everything resident
        plan = make_plan(units, gpu_budget=(k + 2) * 300, prefetch=2, device="cpu")
        res = [i for i, p in enumerate(plan.placements) if p.tier == "gpu"]
        assert len(res) == k
        runs = [b - a - 1 for a, b in zip([-1, *res], [*res, layers], strict=True)]
        assert max(runs) <= -(-layers // k) - 1, (k, res)


def test_budget_below_the_slots_names_the_numbers() -> None:
    with pytest.raises(PlanError, match=r"cannot hold 2 streaming slot\(s\)"):
        make_plan(UNITS, gpu_budget=599, prefetch=2, device="cpu")


@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=40), st.integers(1, 4),
       st.integers(0, 400_000))  # fmt: skip
def test_plan_never_exceeds_budget(sizes: list[int], prefetch: int, budget: int) -> None:
    units = [(f"layers.{i}", n) for i, n in enumerate(sizes)]
    try:
        plan = make_plan(units, budget, prefetch=prefetch, device="cpu")
    except PlanError:
        assert budget < prefetch * max(sizes)
        return
    assert plan.gpu_weight_bytes <= budget
    assert [p.unit for p in plan.placements] == [u for u, _ in units]


TABLE = {"embed": 90}  # the embed unit's table bytes; its other 10 bytes go to the device


def test_embed_table_stays_on_the_host_once_anything_streams() -> None:
    plan = make_plan(UNITS, gpu_budget=1510, prefetch=2, device="cpu", gathered=TABLE)
    embed = plan.placements[0]
    assert (embed.tier, embed.device_bytes, embed.host_only) == ("host", 10, 90)
    assert embed not in plan.streamed and plan.host_tier_bytes == 100
    # 10 + 3 x 300 resident + 2 x 300 slots = 1510
    assert len([p for p in plan.placements if p.tier == "gpu"]) == 3
    assert plan.gpu_weight_bytes == 1510
    assert plan.streamed_bytes == 5 * 300 + 120  # nothing of the embed streams
    # streaming the embed whole instead would stream 5 x 300 + 120 + 100


def test_embed_resident_when_everything_fits() -> None:
    plan = make_plan(UNITS, gpu_budget=2620, device="cpu", gathered=TABLE)
    assert plan.streamed == () and plan.placements[0].tier == "gpu"
    assert plan.host_tier_bytes == 0 and plan.gpu_weight_bytes == 2620


def test_embed_streams_whole_when_that_is_the_only_plan_that_fits() -> None:
    # 2 slots of 300 fit exactly; the embed's 10 device bytes would not
    plan = make_plan(UNITS, gpu_budget=600, prefetch=2, device="cpu", gathered=TABLE)
    assert len(plan.streamed) == len(UNITS) and plan.host_tier_bytes == 0
    with pytest.raises(PlanError, match=r"need at least 600 B"):
        make_plan(UNITS, gpu_budget=599, prefetch=2, device="cpu", gathered=TABLE)


def test_embed_streams_whole_when_that_streams_fewer_bytes() -> None:
    # at 1500 the embed's 10 device bytes would cost a resident layer (300) to save 100
    plan = make_plan(UNITS, gpu_budget=1500, prefetch=2, device="cpu", gathered=TABLE)
    assert plan.placements[0].tier == "cpu" and plan.host_tier_bytes == 0
    assert plan.streamed_bytes == 100 + 5 * 300 + 120  # < 6 x 300 with the table on the host


@given(st.lists(st.integers(1, 10_000), min_size=2, max_size=40), st.integers(1, 4),
       st.integers(0, 400_000), st.floats(0, 1))  # fmt: skip
def test_plan_with_a_host_table_never_exceeds_budget(
    sizes: list[int], prefetch: int, budget: int, table_share: float
) -> None:
    units = [("embed", sizes[0]), *((f"layers.{i}", n) for i, n in enumerate(sizes[1:]))]
    table = {"embed": int(sizes[0] * table_share)}
    try:
        plan = make_plan(units, budget, prefetch=prefetch, device="cpu", gathered=table)
    except PlanError:
        assert budget < prefetch * max(sizes)
        return
    assert plan.gpu_weight_bytes <= budget
    try:  # never worse than streaming the embed whole (which may not fit at all)
        plain = make_plan(units, budget, prefetch=prefetch, device="cpu")
    except PlanError:
        return
    assert plan.streamed_bytes <= plain.streamed_bytes


def test_ranges() -> None:
    names = ["embed", "layers.0", "layers.1", "layers.2", "layers.5", "head"]
    assert _ranges(names) == "embed, layers.0-2, layers.5, head"


def test_roofline_by_hand() -> None:
    # one layer of two 4x8 fp16 matrices; embed and head 16x8
    t = lambda n, s: TensorEntry(n, "float16", s, 0, s[0] * s[1] * 2)  # noqa: E731
    units = (
        UnitEntry("embed", "e", 4096, 0, (t("emb", (16, 8)),)),
        UnitEntry("layers.0", "l", 4096, 0, (t("a", (4, 8)), t("b", (8, 4)))),
        UnitEntry("head", "h", 4096, 0, (t("lm", (16, 8)),)),
    )
    cfg = {"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 8}
    cost = ModelCost.from_manifest(Manifest("float16", cfg, units))
    assert cost.matmul_params == 64 and cost.head_params == 128 and cost.head_dim == 4
    # batch 2, 3 new tokens over 5 visible positions: mean visible = 5 - 1 = 4
    assert cost.pass_flops(2, 3, 5) == 2 * 64 * 6 + 4 * 6 * 4 * 2 * 4 * 1 + 2 * 128 * 2
    m = Machine(stream_bytes_per_s=1000.0, flops=1e12, hbm_bytes_per_s=1e12)
    pre, dec = roofline_seconds(cost, streamed_bytes=500, machine=m, batch=2, prompt=3, new=4)
    assert pre == pytest.approx(0.5) and dec == pytest.approx(1.5)  # transfer-bound passes


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_params_are_the_quantized_weights_dense_sizes(bits: int) -> None:
    """ModelCost.quantized_params: the elements of the weights the converter quantized (its
    list), sized from the same shape's unquantized checkpoint; none without quantization."""
    quantized = SyntheticCheckpoint("tiny-opt", torch.float16, quant=Quantization(bits, 32))
    cost = ModelCost.from_manifest(quantized.manifest)
    dense = SyntheticCheckpoint("tiny-opt", torch.float16).manifest
    listed = set(quantized.manifest.quantization["tensors"])
    sizes = {t.name: math.prod(t.shape) for u in dense.units for t in u.tensors}
    assert listed and cost.quantized_params == sum(sizes[n] for n in listed)
    assert ModelCost.from_manifest(dense).quantized_params == 0


def test_roofline_with_the_cache_in_host_memory() -> None:
    """The "cpu" KV tier: the cache leaves the HBM term; a decode step's host term reads every
    cached position and the streamed weights from host memory; the new positions cross D2H."""
    t = lambda n, s: TensorEntry(n, "float16", s, 0, s[0] * s[1] * 2)  # noqa: E731
    units = (UnitEntry("layers.0", "l", 4096, 0, (t("a", (4, 8)), t("b", (8, 4)))),)
    cfg = {"num_hidden_layers": 1, "num_attention_heads": 2, "hidden_size": 8}
    cost = ModelCost.from_manifest(Manifest("float16", cfg, units))
    per_position = 2 * 2 * 4 * 2  # keys and values x 2 kv heads x head_dim 4 x fp16, one layer
    assert cost.kv_bytes(3, 5) == 3 * 5 * per_position
    assert cost.pass_hbm_bytes(3, 5, kv_host_share=1.0) == cost.weight_bytes
    assert cost.pass_host_bytes(3, 1, 5) == 3 * 6 * per_position  # reads 5, writes 1
    assert cost.pass_host_bytes(3, 4, 4) == 3 * 4 * per_position  # a prompt: writes only
    m = Machine(stream_bytes_per_s=1e12, flops=1e18, hbm_bytes_per_s=1e18, host_bytes_per_s=100.0,
                d2h_bytes_per_s=1e18)  # fmt: skip
    pre, dec = roofline_seconds(cost, 200, m, batch=3, prompt=4, new=3, kv_host_share=1.0)
    assert pre == pytest.approx((3 * 4 * per_position + 200) / 100)
    steps = [3 * (4 + i + 1 + 1) * per_position + 200 for i in range(2)]  # contexts 5 and 6
    assert dec == pytest.approx(sum(steps) / 100)
    slow_d2h = dataclasses.replace(m, host_bytes_per_s=None, d2h_bytes_per_s=1.0)
    pre, _ = roofline_seconds(cost, 200, slow_d2h, batch=3, prompt=4, new=1, kv_host_share=1.0)
    assert pre == pytest.approx(3 * 4 * per_position)
    on_device, _ = roofline_seconds(cost, 200, m, batch=3, prompt=4, new=1)
    assert on_device == pytest.approx(200 / 1e12)  # neither term without the host tier
