"""The cost model and the planner's search: a chosen plan never accounts for more than the GPU
or CPU budget (or a PlanError says why, with the numbers), predictions follow the formula of
engine/costmodel.py by hand, and more budget or bandwidth never predicts fewer tokens/s."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.qmatmul import FUSED_MAX_ROWS
from zeroinf.engine.costmodel import (
    LAUNCH_S,
    PASS_OVERHEAD_S,
    Budgets,
    ModelSize,
    Workload,
    _fit,
    batch_grid,
    choose_plan,
    predict,
    workspace_bytes,
)
from zeroinf.engine.kvcache import kv_token_bytes
from zeroinf.engine.plan import make_plan
from zeroinf.engine.probe import Rates
from zeroinf.engine.roofline import ModelCost
from zeroinf.errors import PlanError
from zeroinf.models import ModelConfig
from zeroinf.sizes import align_up, fmt_bytes

H100 = Rates("test", flops=700e12, hbm_bytes_per_s=3e12, h2d_bytes_per_s=50e9,
             d2h_bytes_per_s=50e9, cpu_attn_bytes_per_s=20e9, disk_bytes_per_s=1e9)  # fmt: skip


def model_size(
    layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int, itemsize: int = 2,
    kv_dtype: str | None = None,
) -> ModelSize:  # fmt: skip
    """A Llama-like model's unit sizes and FLOP counts, from its config numbers."""
    hd = hidden // heads
    cfg = ModelConfig(
        model_type="llama", num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=hd, vocab_size=vocab, max_positions=1 << 16,
        tie_embeddings=False, intermediate_size=ffn, act="silu", norm_eps=1e-5,
    )  # fmt: skip
    layer_params = hidden * (heads + 2 * kv_heads) * hd + heads * hd * hidden + 3 * hidden * ffn
    units = (
        ("embed", align_up(vocab * hidden * itemsize)),
        *((f"layers.{i}", align_up(layer_params * itemsize)) for i in range(layers)),
        ("head", align_up(vocab * hidden * itemsize)),
    )
    cost = ModelCost(
        weight_bytes=sum(nb for _, nb in units), matmul_params=layers * layer_params,
        head_params=vocab * hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=hd,
        itemsize=itemsize,
    )  # fmt: skip
    return ModelSize(units, cost, cfg, itemsize, kv_token_bytes(cfg, itemsize, kv_dtype))


LLAMA_13B = model_size(40, 5120, 40, 40, 13824, 32000)


@st.composite
def models(draw: st.DrawFn) -> ModelSize:
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    hidden = heads * draw(st.sampled_from([16, 32, 64]))
    return model_size(
        layers=draw(st.integers(1, 12)), hidden=hidden, heads=heads, kv_heads=kv_heads,
        ffn=draw(st.integers(1, 4096)), vocab=draw(st.integers(1, 50_000)),
        itemsize=draw(st.sampled_from([2, 4])), kv_dtype=draw(st.sampled_from([None, "int8"])),
    )  # fmt: skip


rates = st.builds(
    Rates, st.just("random"), *(st.floats(1e8, 1e15) for _ in range(5)),
    st.none() | st.floats(1e8, 1e11),
)  # fmt: skip
workloads = st.builds(
    Workload, st.integers(1, 2048), st.integers(1, 256), st.sampled_from([64, 2048]),
    st.integers(1, 512),
)  # fmt: skip


def scaled(size: ModelSize, work: Workload, scale: float) -> int:
    """A budget of `scale` x (the weights + 8 rows' KV cache + the prompt's workspace): around
    1 the interesting trades happen (some resident, some streamed, a few rows)."""
    rows8 = 8 * (work.prompt_len + work.gen_len) * size.kv_token_bytes
    ws = workspace_bytes(size.cfg, size.itemsize, work.prompt_len)
    return int(scale * (size.weight_bytes + rows8 + ws))


@settings(max_examples=200, deadline=None)
@given(models(), rates, workloads, st.floats(0, 2), st.none() | st.floats(0, 1.5),
       st.sampled_from(["cpu", "nvme"]), st.integers(1, 3))  # fmt: skip
def test_chosen_plan_fits_every_budget(
    size: ModelSize, r: Rates, work: Workload, scale: float, cpu_scale: float | None,
    offload: str, depth: int,
) -> None:  # fmt: skip
    gpu = scaled(size, work, scale)
    cpu = None if cpu_scale is None else int(cpu_scale * size.weight_bytes)
    budgets = Budgets(gpu, cpu, offload, depth)
    try:
        plan = choose_plan(size, r, work, budgets, "cuda:0")
    except PlanError as e:
        msg = str(e)
        assert fmt_bytes(gpu) in msg or cpu is not None and fmt_bytes(cpu) in msg
        # not even one row with one slot fits the GPU, or what it leaves to stream the CPU
        p, g = work.prompt_len, work.gen_len
        ws = workspace_bytes(size.cfg, size.itemsize, p, rows=1)
        kv = (p + g) * size.kv_token_bytes
        largest = max(nb for _, nb in size.units)
        if largest + ws + kv <= gpu:
            one = make_plan(list(size.units), gpu, offload, 1, workspace=ws, kv_bytes=kv)
            assert offload == "cpu" and cpu is not None and one.streamed_bytes > cpu, msg
        return
    b = plan.batch
    assert 1 <= b <= work.max_batch and plan.micro_batch * plan.micro_batches == b
    assert plan.kv_bytes == b * (work.prompt_len + work.gen_len) * size.kv_token_bytes
    assert plan.gpu_bytes <= gpu and plan.gpu_budget == gpu
    assert 1 <= plan.prefetch <= depth and plan.kv_tier == "gpu"
    if offload == "cpu" and cpu is not None:
        assert plan.streamed_bytes <= cpu
    assert plan.predicted_tok_s > 0 and plan.predicted_step_s >= 0


@settings(max_examples=100, deadline=None)
@given(models(), rates, workloads, st.floats(0.3, 2), st.integers(0, 1 << 28),
       st.floats(1.0, 100.0), st.sampled_from(["cpu", "nvme"]))  # fmt: skip
def test_more_budget_or_bandwidth_never_predicts_slower(
    size: ModelSize, r: Rates, work: Workload, scale: float, more: int, faster: float, offload: str
) -> None:
    gpu = scaled(size, work, scale)
    try:
        base = choose_plan(size, r, work, Budgets(gpu, None, offload), "cpu")
    except PlanError:
        return
    bigger = choose_plan(size, r, work, Budgets(gpu + more, None, offload), "cpu")
    assert bigger.predicted_tok_s >= base.predicted_tok_s * (1 - 1e-12)
    quick = dataclasses.replace(r, h2d_bytes_per_s=r.h2d_bytes_per_s * faster)
    quicker = choose_plan(size, quick, work, Budgets(gpu, None, offload), "cpu")
    assert quicker.predicted_tok_s >= base.predicted_tok_s * (1 - 1e-12)


def test_prediction_by_hand_transfer_bound() -> None:
    """All streamed at 1 GB/s: every pass is the transfer, plus the stated overhead."""
    size = model_size(2, 64, 4, 2, 128, 100)
    slow = dataclasses.replace(H100, h2d_bytes_per_s=1e9)
    plan = make_plan(list(size.units), 2 * max(nb for _, nb in size.units), "cpu", 2, "cpu")
    assert plan.resident_bytes == 0
    work = Workload(prompt_len=8, gen_len=5)
    pred = predict(plan, size, slow, work, batch=3)
    stream = size.weight_bytes / 1e9
    assert pred.prefill_s == pytest.approx(stream + PASS_OVERHEAD_S)
    assert pred.decode_s == pytest.approx(4 * (stream + PASS_OVERHEAD_S))
    assert pred.step_s == pytest.approx(stream + PASS_OVERHEAD_S)
    assert pred.tok_s == pytest.approx(3 * 5 / (5 * (stream + PASS_OVERHEAD_S)))


def test_prediction_by_hand_compute_bound() -> None:
    """All resident: a decode step is FLOPs / rate + HBM bytes / rate + launches, per
    micro-batch; two micro-batches read the weights twice."""
    size = model_size(2, 64, 4, 2, 128, 100)
    plan = make_plan(list(size.units), size.weight_bytes, "cpu", 2, "cpu")
    work = Workload(prompt_len=8, gen_len=2)  # one decode step, at context 9
    r = dataclasses.replace(H100, flops=1e9, hbm_bytes_per_s=1e9)

    def step(rows: int) -> float:
        flops = size.cost.pass_flops(rows, 1, 9)
        act = 2 * (8 * 64 + 3 * 128) * 2 * rows * 2  # ACT_TRAFFIC x bytes x tokens x layers
        hbm = size.weight_bytes + size.kv_token_bytes * rows * 9 + act
        return flops / 1e9 + hbm / 1e9 + len(size.units) * LAUNCH_S

    one = predict(plan, size, r, work, batch=4)
    two = predict(plan, size, r, work, batch=4, micro_batch=2)
    assert one.decode_s == pytest.approx(step(4) + PASS_OVERHEAD_S)
    assert two.decode_s == pytest.approx(2 * step(2) + PASS_OVERHEAD_S)
    assert two.decode_s > one.decode_s


def test_many_rows_pay_for_dequantizing_quantized_weights() -> None:
    """Beyond FUSED_MAX_ROWS rows a quantized matmul writes its weights in 16 bits and reads
    them back (kernels/qmatmul.py): 2 x itemsize bytes per quantized weight and prefill chunk
    or decode micro-batch; a decode micro-batch within the fused kernel's rows pays nothing."""
    size = model_size(2, 64, 4, 2, 128, 100)
    q = dataclasses.replace(size, cost=dataclasses.replace(size.cost, quantized_params=10**6))
    plan = make_plan(list(size.units), size.weight_bytes, "cpu", 2, "cpu")  # all resident
    r = dataclasses.replace(H100, hbm_bytes_per_s=1e9)
    work = Workload(prompt_len=128, gen_len=2, prefill_tokens=512)  # 4 rows a chunk
    chunk = 2 * 2 * 10**6 / 1e9  # seconds per chunk: 2 bytes written, 2 read, per weight
    for batch, chunks in ((4, 1), (12, 3)):
        dense, quant = (predict(plan, s, r, work, batch) for s in (size, q))
        assert quant.prefill_s - dense.prefill_s == pytest.approx(chunks * chunk)
        assert quant.decode_s == pytest.approx(dense.decode_s)  # 4 or 12 rows: fused
    wide = Workload(prompt_len=1, gen_len=2, prefill_tokens=1024)
    dense, quant = (predict(plan, s, r, wide, FUSED_MAX_ROWS + 1) for s in (size, q))
    assert quant.decode_s - dense.decode_s == pytest.approx(chunk)


def test_one_slot_serialises_copy_and_compute() -> None:
    size = model_size(4, 64, 4, 2, 128, 100)
    r = dataclasses.replace(H100, flops=1e9, hbm_bytes_per_s=1e9, h2d_bytes_per_s=1e9)
    work = Workload(prompt_len=8, gen_len=3)
    slot = max(nb for _, nb in size.units)
    two = predict(make_plan(list(size.units), 2 * slot, "cpu", 2, "cpu"), size, r, work, 2)
    one = predict(make_plan(list(size.units), 2 * slot, "cpu", 1, "cpu"), size, r, work, 2)
    assert one.decode_s > two.decode_s


def test_llama_13b_on_a_24_gib_card() -> None:
    """The planner trades resident weights for KV rows: a 24 GiB budget for a 26 GB model
    holds a batch that streams most layers, and says what it predicts."""
    budgets = Budgets(24 << 30, None, "cpu", 2)
    plan = choose_plan(LLAMA_13B, H100, Workload(512, 32), budgets, "cuda:0")
    assert plan.gpu_bytes <= 24 << 30 and plan.batch > 8 and plan.streamed
    text = str(plan)
    assert f"batch {plan.batch} = " in text and "tok/s" in text and "KV cache" in text
    # the search's optimum beats its neighbours on the grid
    for b in (plan.batch // 2, plan.batch + plan.batch // 2):
        try:
            other = choose_plan(LLAMA_13B, H100, Workload(512, 32), budgets, "cuda:0", batch=b)
        except PlanError:
            continue
        assert other.predicted_tok_s <= plan.predicted_tok_s


def test_given_batch_is_kept() -> None:
    plan = choose_plan(LLAMA_13B, H100, Workload(512, 32), Budgets(24 << 30), "cuda:0", batch=7)
    assert plan.batch == 7


def test_nothing_fits_names_the_numbers() -> None:
    with pytest.raises(PlanError, match=r"gpu_memory 1.00 GiB cannot hold .* KV cache"):
        choose_plan(LLAMA_13B, H100, Workload(4096, 32), Budgets(1 << 30), "cuda:0")
    with pytest.raises(PlanError, match=r"cpu_memory 1.00 GiB cannot hold"):
        choose_plan(LLAMA_13B, H100, Workload(512, 32), Budgets(24 << 30, 1 << 30), "cuda:0")


def test_nvme_streams_at_the_disk() -> None:
    work, budgets = Workload(512, 32), Budgets(16 << 30, None, "nvme")
    nvme = choose_plan(LLAMA_13B, H100, work, budgets, "cuda:0", batch=8)
    cpu = choose_plan(LLAMA_13B, H100, work, dataclasses.replace(budgets, offload="cpu"),
                      "cuda:0", batch=8)  # fmt: skip
    disk_s = nvme.streamed_bytes / H100.disk_bytes_per_s
    assert nvme.predicted_step_s == pytest.approx(disk_s + PASS_OVERHEAD_S, rel=0.01)
    assert cpu.predicted_tok_s > nvme.predicted_tok_s


def test_batch_grid() -> None:
    assert batch_grid(1) == [1]
    assert batch_grid(100) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 100]


def test_workspace_counts_the_prefills_waiting_chunks() -> None:
    """Executor.forward keeps every prefill chunk's hidden states [rows, P, hidden] on the device
    while a unit serves the chunks in turn: the plan reserves the chunks beyond the workspace's
    one (OPT-30B's shape, batch 192, P 512, chunks of 4 rows: 188 rows waiting, 1.31 GiB, which
    the int8 host tier's 24 GiB plan had left out: peak 26.5 GB). One chunk waits for nothing."""
    size = model_size(48, 7168, 56, 56, 28672, 50272)
    work = Workload(prompt_len=512, gen_len=32, prefill_tokens=2048)
    budgets = Budgets(gpu=24 << 30)
    for batch, waiting in ((192, 188), (96, 92), (4, 0), (3, 0)):
        plan = _fit(size, work, budgets, "cuda", batch, batch, 2, "cpu")
        one_chunk = workspace_bytes(size.cfg, 2, min(batch, 4) * 512, rows=batch)
        assert plan.workspace == one_chunk + waiting * 512 * 7168 * 2
        assert plan.gpu_bytes <= budgets.gpu
