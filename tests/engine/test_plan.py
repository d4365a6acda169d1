"""The planner and the roofline arithmetic: pure functions, checked against hand counts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zeroinf.engine.plan import _ranges, _spread_order, make_plan
from zeroinf.engine.roofline import Machine, ModelCost, roofline_seconds
from zeroinf.errors import PlanError
from zeroinf.format import Manifest, TensorEntry, UnitEntry

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


@pytest.mark.parametrize("n", [1, 2, 5, 8, 40])
def test_spread_order_is_a_permutation(n: int) -> None:
    assert sorted(_spread_order(n)) == list(range(n))


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
