"""The host ("cpu") KV tier: the cache in host memory, attention on the CPU
(models/host_attention.py), chosen by the planner by predicted cost.

Oracles: transformers' own greedy generate, and the device ("gpu") tier's tokens in float32 on
the same weights (identical for every family, micro-batch count and int8 cache); for the host
attention function, models.layers.attend over a device-tier cache; for the planner, the budgets
it was given and hand-made rates under which one tier is plainly faster."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import zeroinf
from zeroinf.cli import bench
from zeroinf.convert import convert
from zeroinf.engine import costmodel
from zeroinf.engine.costmodel import (
    HOST_ATTN_IN_RUN,
    Budgets,
    ModelSize,
    Workload,
    choose_plan,
    predict,
    workspace_bytes,
)
from zeroinf.engine.kvcache import kv_token_bytes, new_kv_cache
from zeroinf.engine.plan import KV_TIERS, make_plan
from zeroinf.engine.probe import Rates
from zeroinf.engine.roofline import ModelCost
from zeroinf.errors import ConfigError, PlanError
from zeroinf.models import ModelConfig
from zeroinf.models import host_attention as ha
from zeroinf.models.base import build_context
from zeroinf.models.layers import attend
from zeroinf.sizes import align_up
from zeroinf.synthetic import SHAPES
from zeroinf.tiny import save_tiny_hf, tiny_prompts

NEW = 6
FAMILIES = {  # name: (model_type, overrides)
    "llama": ("llama", {}),  # GQA
    "mistral-window": ("mistral", dict(sliding_window=4)),
    "opt": ("opt", {}),
    "gpt_neox": ("gpt_neox", {}),
    "mixtral": ("mixtral", {}),
}


def _tokens(path: Path, tier: str, kv_dtype: str | None = None) -> list[torch.Tensor]:
    """Greedy tokens of the prompts with the KV cache on `tier`: one micro-batch, then
    micro-batches of 2 rows (3 rows: 2 + 1)."""
    ids, mask = tiny_prompts(64)
    out = []
    with zeroinf.load(path, device="cpu", gpu_memory=None, kv_dtype=kv_dtype,
                      kv_tier=tier) as model:  # fmt: skip
        assert model.plan.kv_tier == tier
        assert all(c.host == (tier == "cpu") for c in model._new_kv(1, 2))
        for rows in (None, 2):
            model.micro_batch = rows
            out.append(model.generate(ids, attention_mask=mask, max_new_tokens=NEW))
    return out


def _checkpoint_and_reference(
    tmp_path: Path, model_type: str, **overrides: object
) -> tuple[Path, torch.Tensor]:
    """A tiny random checkpoint, converted, and transformers' greedy tokens (float32) for
    tiny_prompts."""
    save_tiny_hf(tmp_path / "hf", model_type, seed=5, **overrides)
    path = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids, mask = tiny_prompts(64)
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                           do_sample=False, pad_token_id=0)  # fmt: skip
    return path, want


@pytest.mark.parametrize("name", list(FAMILIES))
def test_host_tier_equals_device_tier_and_transformers(tmp_path: Path, name: str) -> None:
    model_type, overrides = FAMILIES[name]
    path, want = _checkpoint_and_reference(tmp_path, model_type, **overrides)
    for got in _tokens(path, "cpu") + _tokens(path, "gpu"):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_split_tier_equals_transformers(tmp_path: Path, family: str, kv_dtype: str | None) -> None:
    """The "split" tier: the planner's layers keep their cache on the device, the others in
    host memory (attention on the CPU); the tokens are transformers' (float32), and an int8
    cache's equal the device tier's."""
    path, want = _checkpoint_and_reference(tmp_path, family)
    ids, mask = tiny_prompts(64)
    if kv_dtype:
        want = _tokens(path, "gpu", kv_dtype)[0]
    kw = dict(device="cpu", gpu_memory="64MiB", batch_size="auto", prompt_len=7,
              max_new_tokens=NEW, max_batch_size=4, kv_dtype=kv_dtype)  # fmt: skip
    with zeroinf.load(path, kv_tier="split", **kw) as model:
        plan, layers = model.plan, model.config.num_layers
        assert plan.kv_tier == "split" and 0 < len(plan.kv_device_layers) < layers
        host = [c.host for c in model._new_kv(1, 2)]
        assert host == [i not in plan.kv_device_layers for i in range(layers)]
        per_layer = model.kv_bytes(plan.batch, 7 + NEW) // layers
        assert plan.kv_bytes == per_layer * len(plan.kv_device_layers)
        assert plan.kv_host_bytes == per_layer * (layers - len(plan.kv_device_layers))
        assert f"the cache of layers {plan.kv_device_layers[0]}" in str(plan)
        for rows in (None, 2):
            model.micro_batch = rows
            got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_int8_host_tier_equals_int8_device_tier(tmp_path: Path, family: str) -> None:
    save_tiny_hf(tmp_path / "hf", family, seed=5)
    path = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    want = _tokens(path, "gpu", "int8")
    for got in _tokens(path, "cpu", "int8"):
        torch.testing.assert_close(got, want[0], rtol=0, atol=0)
    torch.testing.assert_close(want[1], want[0], rtol=0, atol=0)


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
def test_host_tier_refill_equals_one_at_a_time(tmp_path: Path, kv_dtype: str | None) -> None:
    """Continuous refill over a host cache: prefills at later cache indices (the host path
    with start > 0), one-token prompts and compactions of the host cache."""
    save_tiny_hf(tmp_path / "hf", "llama", seed=5)
    path = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(4, 64, (int(n),), generator=g).tolist() for n in (5, 1, 9, 3, 7, 4)]
    with zeroinf.load(path, device="cpu", gpu_memory=None, kv_dtype=kv_dtype) as model:
        want = [model.generate([p], max_new_tokens=5)[0, len(p) :].tolist() for p in prompts]
    with zeroinf.load(path, device="cpu", gpu_memory=None, kv_dtype=kv_dtype,
                      kv_tier="cpu") as model:  # fmt: skip
        stream = model.generate_stream(prompts, batch_size=2, max_new_tokens=5, cache_tokens=16)
        got = {req.key: toks for req, toks in stream}
    assert [got[i] for i in range(len(prompts))] == want


def _cfg(heads: int, kv_heads: int, window: int | None = None) -> ModelConfig:
    return ModelConfig(model_type="llama", num_layers=1, hidden_size=16 * heads,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=16,
                       intermediate_size=8, vocab_size=8, max_positions=64,
                       tie_embeddings=False, norm_eps=1e-5, act="silu",
                       sliding_window=window)  # fmt: skip


@pytest.mark.parametrize("kv_dtype", [None, "int8"])
@pytest.mark.parametrize("heads,kv_heads,window", [(4, 4, None), (6, 2, 3), (4, 1, None)])
def test_host_attention_equals_device_attention(
    monkeypatch: pytest.MonkeyPatch, kv_dtype: str | None, heads: int, kv_heads: int,
    window: int | None,
) -> None:  # fmt: skip
    """A prefill, a second prefill at a later index (start > 0), then whole-cache decode
    steps: the host path writes the same cache and returns the device path's output, with
    chunks of one (row, kv head) forced."""
    monkeypatch.setattr(ha, "CHUNK_BYTES", 1)
    cfg = _cfg(heads, kv_heads, window)
    B, T, D = 3, 16, 16
    g = torch.Generator().manual_seed(0)
    dev_kv = new_kv_cache(cfg, B, T, torch.float32, torch.device("cpu"), kv_dtype)[0]
    host_kv = new_kv_cache(cfg, B, T, torch.float32, torch.device("cpu"), kv_dtype, (0,))[0]
    am = torch.ones(B, T, dtype=torch.long)
    am[1, :2] = 0
    steps = [build_context(am, 0, 5), build_context(am, 5, 3)]
    steps += [build_context(am, s, 1, whole_cache=T) for s in (8, 9, 10)]
    for ctx in steps:
        S = ctx.positions.shape[1]
        q = torch.randn(B, heads, S, D, generator=g)
        k, v = (torch.randn(B, kv_heads, S, D, generator=g) for _ in "kv")
        want = attend(q, k, v, dev_kv, ctx, D**-0.5, window)
        got = attend(q, k, v, host_kv, ctx, D**-0.5, window)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(dataclasses.astuple(host_kv)[:4], dataclasses.astuple(dev_kv)[:4],
                    strict=True):  # fmt: skip
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.integers(1, 16), st.sampled_from([1, 2, 4, 8]), st.integers(1, 64),
       st.integers(1, 1 << 16), st.sampled_from([64, 128]), st.sampled_from([2, 4]), st.booleans(),
       st.booleans())  # fmt: skip
def test_chunks_stay_bounded(
    B: int, Hkv: int, n_rep: int, S: int, T: int, D: int, itemsize: int, copies: bool,
    quantized: bool,
) -> None:  # fmt: skip
    rows, heads = ha.chunk_shape(B, Hkv, n_rep, S, T, D, itemsize, copies, quantized)
    assert rows >= 1 and 1 <= heads <= Hkv and (rows == 1 or heads == Hkv)
    per = ha.pair_bytes(n_rep, S, T, D, itemsize, copies, quantized)
    assert rows * heads * per <= max(ha.CHUNK_BYTES, per)


def test_chunks_by_hand() -> None:
    """OPT-30B's decode at batch 96 over a 16-bit cache copies nothing: one call per layer; an
    int8 cache is dequantized a few rows at a time."""
    assert ha.chunk_shape(96, 56, 1, 1, 544, 128, 2) == (ha.CHUNK_BYTES // (4 * 544 * 56), 56)
    per = 4 * 544 + 2 * 544 * 128 * (4 + 2 + 2)  # scores, float32 and fp16 dequantized K and V
    assert ha.chunk_shape(96, 56, 1, 1, 544, 128, 2, quantized=True) == (
        ha.CHUNK_BYTES // (per * 56), 56)  # fmt: skip


def test_errors(tmp_path: Path) -> None:
    save_tiny_hf(tmp_path / "hf", "llama", seed=5)
    path = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    with pytest.raises(ConfigError, match=r"kv_tier='disk': use 'gpu', 'cpu'"):
        zeroinf.load(path, device="cpu", kv_tier="disk")
    units = [("embed", 10), ("layers.0", 10), ("head", 10)]
    plan = make_plan(units, 100, "cpu", 1, "cpu")
    with pytest.raises(PlanError, match="a KV cache lives on one side only"):
        dataclasses.replace(plan, kv_tier="cpu", kv_bytes=5)
    with pytest.raises(PlanError, match="kv_tier='nvme'"):
        dataclasses.replace(plan, kv_tier="nvme")
    with pytest.raises(ConfigError, match="kv_tier='x'"):
        choose_plan(_size(), FAST_CPU, Workload(8, 4), Budgets(1 << 30), "cuda:0", kv_tiers=("x",))
    with pytest.raises(SystemExit):
        bench.parse_args(["--kv-tier", "disk"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--repeat", "0"])
    with pytest.raises(ConfigError, match="kv_tier='split' needs batch_size='auto'"):
        zeroinf.load(path, device="cpu", kv_tier="split")
    with pytest.raises(PlanError, match="the 'split' tier, and only it, names the layers"):
        dataclasses.replace(plan, kv_tier="split")
    with pytest.raises(PlanError, match="the 'split' tier, and only it, names the layers"):
        dataclasses.replace(plan, kv_tier="cpu", kv_device_layers=(0,))


# ---------------------------------------------------------------------------------------------
# The planner


def _size(
    layers: int = 4, hidden: int = 256, heads: int = 4, kv_heads: int = 4, ffn: int = 512,
    vocab: int = 1000, kv_dtype: str | None = None,
) -> ModelSize:  # fmt: skip
    """A Llama-like model's unit sizes (fp16) and FLOP counts, from its config numbers."""
    hd = hidden // heads
    cfg = ModelConfig(model_type="llama", num_layers=layers, hidden_size=hidden,
                      num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, vocab_size=vocab,
                      max_positions=1 << 16, tie_embeddings=False, intermediate_size=ffn,
                      act="silu", norm_eps=1e-5)  # fmt: skip
    layer = 2 * (hidden * (heads + 2 * kv_heads) * hd + heads * hd * hidden + 3 * hidden * ffn)
    table = align_up(2 * vocab * hidden)
    units = (("embed", table), *((f"layers.{i}", align_up(layer)) for i in range(layers)),
             ("head", table))  # fmt: skip
    cost = ModelCost(weight_bytes=sum(nb for _, nb in units), matmul_params=layers * layer / 2,
                     head_params=vocab * hidden, layers=layers, heads=heads, kv_heads=kv_heads,
                     head_dim=hd, itemsize=2)  # fmt: skip
    return ModelSize(units, cost, cfg, 2, kv_token_bytes(cfg, 2, kv_dtype), kv_dtype)


FAST_CPU = Rates("test", flops=700e12, hbm_bytes_per_s=3e12, h2d_bytes_per_s=50e9,
                 d2h_bytes_per_s=50e9, cpu_attn_bytes_per_s=1e15,
                 cpu_attn_int8_bytes_per_s=1e15)  # fmt: skip
SLOW_CPU = dataclasses.replace(FAST_CPU, cpu_attn_bytes_per_s=1e6, cpu_attn_int8_bytes_per_s=1e6)


def _kv_bound_budget(size: ModelSize, work: Workload) -> int:
    """Two slots, the workspace of a few rows and the KV cache of two rows: the device tier
    holds few rows, the host tier many."""
    slot = max(nb for _, nb in size.units)
    ws = workspace_bytes(size.cfg, size.itemsize, work.prompt_len * 8, rows=256)
    return 2 * slot + ws + 2 * (work.prompt_len + work.gen_len) * size.kv_token_bytes


def test_planner_picks_the_host_tier_when_cpu_attention_is_fast() -> None:
    size, work = _size(), Workload(512, 32, max_batch=64)
    budgets = Budgets(_kv_bound_budget(size, work), None, "cpu", 2, host=1 << 40)
    fast = choose_plan(size, FAST_CPU, work, budgets, "cuda:0")
    assert fast.kv_tier == "cpu" and fast.kv_bytes == 0 and fast.batch > 2
    assert fast.kv_host_bytes == fast.batch * (512 + 32) * size.kv_token_bytes
    assert "KV cache on cpu" in str(fast) and "KV cache in host memory" in str(fast)
    slow = choose_plan(size, SLOW_CPU, work, budgets, "cuda:0")
    assert slow.kv_tier == "gpu" and slow.kv_host_bytes == 0 and slow.kv_bytes > 0
    # each tier's prediction, re-derived: the winner is the faster of the two
    for rates, plan in ((FAST_CPU, fast), (SLOW_CPU, slow)):
        other = "gpu" if plan.kv_tier == "cpu" else "cpu"
        rival = choose_plan(size, rates, work, budgets, "cuda:0", kv_tiers=(other,))
        assert rival.predicted_tok_s < plan.predicted_tok_s
    # without a known host budget the host tier is searched only when asked for
    assert choose_plan(size, FAST_CPU, work, dataclasses.replace(budgets, host=None),
                       "cuda:0").kv_tier == "gpu"  # fmt: skip


def test_host_decode_costs_cpu_attention() -> None:
    """A host-tier decode step grows with the KV bytes over the CPU attention rate; the device
    tier's does not depend on that rate."""
    size, work = _size(), Workload(64, 3)
    plan = make_plan(list(size.units), size.weight_bytes, "cpu", 2, "cuda:0")
    host = dataclasses.replace(plan, kv_tier="cpu")
    slow = dataclasses.replace(FAST_CPU, cpu_attn_bytes_per_s=1e9)
    a = predict(host, size, FAST_CPU, work, 8)
    b = predict(host, size, slow, work, 8)
    kv_read = sum(size.kv_token_bytes * 8 * c for c in (65, 66))  # two decode steps
    rate = HOST_ATTN_IN_RUN  # the share of the probe's rate a run's kernel reads at
    assert b.decode_s - a.decode_s == pytest.approx(
        kv_read / (1e9 * rate) - kv_read / (1e15 * rate), rel=1e-6
    )
    assert predict(plan, size, slow, work, 8) == predict(plan, size, FAST_CPU, work, 8)


def test_host_decode_shares_host_memory_with_the_stream() -> None:
    """With the host memory rate known, a host-tier pass takes at least (cache bytes read and
    written + streamed bytes) / that rate; the device tier ignores it."""
    size, work = _size(), Workload(64, 3)
    plan = make_plan(list(size.units), size.weight_bytes // 2, "cpu", 2, "cuda:0")
    host = dataclasses.replace(plan, kv_tier="cpu")
    narrow = dataclasses.replace(FAST_CPU, host_memory_bytes_per_s=1e6)
    got = predict(host, size, narrow, work, 8)
    positions = [64] + [c + 1 for c in (65, 66)]  # the prompt written; each step reads, writes
    want = [(size.kv_token_bytes * 8 * n + plan.rank_streamed_bytes) / 1e6 for n in positions]
    assert got.prefill_s == pytest.approx(want[0] + costmodel.PASS_OVERHEAD_S)
    assert got.decode_s == pytest.approx(sum(want[1:]) + 2 * costmodel.PASS_OVERHEAD_S)
    wide = dataclasses.replace(FAST_CPU, host_memory_bytes_per_s=1e18)
    assert predict(host, size, wide, work, 8) == predict(host, size, FAST_CPU, work, 8)
    assert predict(plan, size, narrow, work, 8) == predict(plan, size, FAST_CPU, work, 8)


def test_units_compute_in_order_as_their_copies_arrive() -> None:
    """_in_order_s by hand: units R S S S R (R resident, S streamed), each computing 1 s, each
    copy 2 s, two slots."""
    compute, copy = [1.0] * 5, [None, 2.0, 2.0, 2.0, None]
    # copies: S1 0-2, S2 2-4, S3 waits for S1's slot (free at 3) and the link (4): 4-6;
    # compute: R0 0-1, S1 2-3, S2 4-5, S3 6-7, R4 7-8
    assert costmodel._in_order_s(compute, copy, slots=2) == 8.0
    # one slot: S2's copy waits for S1's compute (3): 3-5, S3's for S2's (6): 6-8
    assert costmodel._in_order_s(compute, copy, slots=1) == 10.0
    # arrays of contexts: each element its own pass
    many = costmodel._in_order_s([np.array([1.0, 3.0])] * 5, copy, slots=2)
    assert many.tolist() == [8.0, 15.0]  # R0 0-3, S1 3-6, S2 6-9, S3 9-12, R4 12-15


def test_beside_rates() -> None:
    """Each at the rate the probe measured beside the other (5 and 6 of a shared 11); the link
    takes what a slower attention leaves of the 11, up to its own rate; unmeasured, its own."""
    r = dataclasses.replace(FAST_CPU, cpu_attn_bytes_per_s=10, h2d_bytes_per_s=10,
                            cpu_attn_h2d_bytes_per_s=5, h2d_cpu_attn_bytes_per_s=6)  # fmt: skip
    assert costmodel._beside_rates(10.0, 10.0, r) == pytest.approx((5.0, 6.0))
    assert costmodel._beside_rates(8.0, 10.0, r) == pytest.approx((4.0, 7.0))  # in-run share
    assert costmodel._beside_rates(2.0, 10.0, r) == pytest.approx((1.0, 10.0))  # int8's, scaled
    assert costmodel._beside_rates(10.0, 5.0, r) == pytest.approx((5.0, 5.0))  # its own cap
    assert costmodel._beside_rates(10.0, 10.0, FAST_CPU) == (10.0, 10.0)


def test_planner_splits_opt_30b_on_the_h100_machine() -> None:
    """OPT-30B fp16 in a 24 GiB budget, batch up to 96, with the rates measured on the H100
    machine (2026-11-24, docs/benchmarks.md): the CPU's attention over the whole cache (72 GB
    per step at ~60 GB/s) outlasts the link's 37.7 GB, so the planner moves some layers' cache
    to the device, streamed layers, spread out, and predicts more tokens/s than all on host."""
    layers, hidden, ffn, vocab = 48, 7168, 28672, 50272
    cfg = ModelConfig(model_type="opt", num_layers=layers, hidden_size=hidden, num_heads=56,
                      num_kv_heads=56, head_dim=128, vocab_size=vocab, max_positions=2048,
                      tie_embeddings=True, intermediate_size=ffn, act="relu",
                      norm_eps=1e-5)  # fmt: skip
    params = 4 * hidden * hidden + 2 * hidden * ffn
    units = (
        ("embed", align_up(2 * vocab * hidden)),
        *((f"layers.{i}", align_up(2 * params)) for i in range(layers)),
        ("head", 4096),
    )
    cost = ModelCost(weight_bytes=sum(nb for _, nb in units), matmul_params=layers * params,
                     head_params=vocab * hidden, layers=layers, heads=56, kv_heads=56,
                     head_dim=128, itemsize=2)  # fmt: skip
    size = ModelSize(units, cost, cfg, 2, kv_token_bytes(cfg, 2, None), None,
                     (("embed", 2 * vocab * hidden),))  # fmt: skip
    rates = Rates("H100", flops=756e12, hbm_bytes_per_s=3.0e12, h2d_bytes_per_s=54.6e9,
                  d2h_bytes_per_s=55e9, cpu_attn_bytes_per_s=65e9,
                  host_memory_bytes_per_s=114e9, cpu_attn_h2d_bytes_per_s=56.6e9,
                  h2d_cpu_attn_bytes_per_s=44.9e9)  # fmt: skip
    work, budgets = Workload(512, 32, max_batch=96), Budgets(24 << 30, host=110 << 30)
    plan = choose_plan(size, rates, work, budgets, "cuda:0")
    on_host = choose_plan(size, rates, work, budgets, "cuda:0", kv_tiers=("cpu",))
    assert plan.kv_tier == "split" and plan.predicted_tok_s > on_host.predicted_tok_s
    streamed = {int(p.unit[7:]) for p in plan.streamed if p.unit.startswith("layers.")}
    assert set(plan.kv_device_layers) <= streamed
    gaps = np.diff(plan.kv_device_layers)
    assert gaps.max() - gaps.min() <= 3  # spread over the pass
    assert plan.gpu_bytes <= budgets.gpu


@st.composite
def _models(draw: st.DrawFn) -> ModelSize:
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 4]))
    return _size(
        layers=draw(st.integers(1, 12)), hidden=heads * draw(st.sampled_from([16, 32, 64])),
        heads=heads, kv_heads=kv_heads, ffn=draw(st.integers(1, 4096)),
        vocab=draw(st.integers(1, 50_000)), kv_dtype=draw(st.sampled_from([None, "int8"])),
    )  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(_models(), st.builds(Rates, st.just("random"), *(st.floats(1e8, 1e15) for _ in range(5)),
                            st.none(), st.floats(1e8, 1e15), st.none() | st.floats(1e8, 1e15),
                            st.none() | st.floats(1e8, 1e15), st.none() | st.floats(1e8, 1e15)),
       st.integers(1, 1024), st.integers(1, 64), st.floats(0.1, 3), st.none() | st.floats(0, 3),
       st.floats(0, 3), st.sampled_from(["cpu", "nvme"]),
       st.sampled_from([None, ("cpu",), ("split",), ("gpu", "cpu")]))  # fmt: skip
def test_plans_of_every_tier_fit_every_budget(
    size: ModelSize, r: Rates, prompt: int, gen: int, scale: float, cpu_scale: float | None,
    host_scale: float, offload: str, tiers: tuple[str, ...] | None,
) -> None:  # fmt: skip
    work = Workload(prompt, gen, max_batch=256)
    gpu = int(scale * (size.weight_bytes + 4 * (prompt + gen) * size.kv_token_bytes))
    weights = size.weight_bytes
    cpu = None if cpu_scale is None else int(cpu_scale * weights)
    host = int(host_scale * (weights + 16 * (prompt + gen) * size.kv_token_bytes))
    budgets = Budgets(gpu, cpu, offload, 2, host=host)
    try:
        plan = choose_plan(size, r, work, budgets, "cuda:0", kv_tiers=tiers)
    except PlanError:
        # the search missed nothing: not even one row with one slot fits, on any tier tried
        for tier in tiers or KV_TIERS:
            for n in costmodel._device_layer_counts(tier, size.cfg.num_layers):
                with pytest.raises(PlanError):
                    costmodel._fit(size, work, budgets, "cuda:0", 1, 1, 1, tier, n)
        return
    kv = plan.batch * (prompt + gen) * size.kv_token_bytes
    layers = size.cfg.num_layers
    on_device = {"gpu": layers, "cpu": 0, "split": len(plan.kv_device_layers)}[plan.kv_tier]
    assert plan.kv_tier in (tiers or KV_TIERS)
    assert plan.gpu_bytes <= gpu
    assert (plan.kv_bytes, plan.kv_host_bytes) == (kv // layers * on_device,
                                                   kv // layers * (layers - on_device))  # fmt: skip
    assert len(plan.kv_host_layers(layers)) == layers - on_device
    pinned = plan.streamed_bytes if offload == "cpu" else 0
    assert pinned + plan.kv_host_bytes <= host
    if cpu is not None:
        assert pinned + plan.kv_host_bytes <= cpu
    assert plan.predicted_tok_s > 0


def test_auto_load_with_the_host_tier(tmp_path: Path) -> None:
    save_tiny_hf(tmp_path / "hf", "opt", seed=5)
    path = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    ids, mask = tiny_prompts(64)
    kw = dict(device="cpu", gpu_memory="64MiB", batch_size="auto", prompt_len=7,
              max_new_tokens=NEW, max_batch_size=4)  # fmt: skip
    with zeroinf.load(path, kv_tier="cpu", **kw) as model:
        assert model.plan.kv_tier == "cpu" and model.plan.kv_bytes == 0
        assert model.plan.kv_host_bytes == model.kv_bytes(model.batch_size, 7 + NEW)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    with zeroinf.load(path, **kw) as model:  # a CPU device: the device tier unless asked
        assert model.plan.kv_tier == "gpu"
        want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_host_out_mode_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """ZEROINF_HOST_OUT (an A/B switch of the host tier's output copy) names itself when wrong;
    "copy" is torch's copy (on a CPU-only machine the tier never calls it: no device)."""
    out = torch.arange(6.0).view(1, 2, 3)
    monkeypatch.setenv("ZEROINF_HOST_OUT", "dma")
    with pytest.raises(ConfigError, match="ZEROINF_HOST_OUT='dma': use one of copy, sm"):
        ha._to_device(out, torch.device("cpu"))
    monkeypatch.setenv("ZEROINF_HOST_OUT", "copy")
    assert torch.equal(ha._to_device(out, torch.device("cpu")), out)


def test_bench_kv_tier(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run.json"
    argv = ["--model", "tiny-llama", "--device", "cpu", "--prompt-len", "8", "--gen-len", "3",
            "--gpu-memory", "8MiB", "--batch-size", "2", "--kv-tier", "cpu", "--repeat", "3",
            "--json", out]  # fmt: skip
    assert bench.main([str(a) for a in argv]) == 0
    r = json.loads(out.read_text())
    assert r["kv_tier"] == "cpu" and r["total_tok_per_s"] > 0 and "prediction_error" in r
    printed = capsys.readouterr().out
    assert "on cpu" in printed and "later calls on the same cache" in printed
    # --repeat 3: two more calls, each beside the same roofline; the timed call's figures below
    # are its own (its host stats taken before them)
    assert len(r["later_calls"]) == 2
    for c in r["later_calls"]:
        assert c["ratio_to_roofline"] == pytest.approx(c["tok_per_s"] / r["roofline_tok_per_s"])
        assert c["decode_step_s"] > 0 and (ha.native is None or c["kernel_s"] > 0)
    # The timed call's host work: the prompt's keys and values through the writer thread (the
    # cache's first 8 of 11 positions), and one kernel call per layer and decode step.
    h = r["host_attention"]
    assert h["writer_bytes"] == r["kv_bytes"] * 8 // 11 and h["writer_s"] > 0
    if sys.platform == "linux":  # the mappings that hold the cache, resident (zero-filled)
        assert 0 <= h["huge_page_share"] <= 1
    if ha.native is not None:
        layers = SHAPES["tiny-llama"]["num_hidden_layers"]
        assert h["kernel_calls"] == 2 * layers and h["kernel_s"] > 0
        assert h["kernel_s_per_step"] == pytest.approx(h["kernel_s"] / 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_dtype", [None, "int8"])
@pytest.mark.parametrize("host_out", ["copy", "sm"])  # ZEROINF_HOST_OUT: the output's way back
def test_host_tier_on_cuda_equals_device_tier(
    tmp_path: Path, kv_dtype: str | None, host_out: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU: pinned staging, prompts' attention on the device, decode without CUDA graphs,
    refill prefills at later cache indices; float32 tokens equal the device tier's (with its
    graphs), the attention output brought back by the copy engine or the GPU's cores."""
    monkeypatch.setenv("ZEROINF_HOST_OUT", host_out)
    save_tiny_hf(tmp_path / "hf", "llama", seed=5)
    path = convert(tmp_path / "hf", tmp_path / "zi", progress=False)
    ids, mask = tiny_prompts(64)
    prompts = [[5, 9, 11], [7], [3, 4, 5, 6, 7, 8, 9], [12, 13]]
    outs, streams = {}, {}
    for tier in ("gpu", "cpu"):
        with zeroinf.load(path, device="cuda", gpu_memory=None, kv_dtype=kv_dtype,
                          kv_tier=tier) as model:  # fmt: skip
            outs[tier] = model.generate(ids, attention_mask=mask, max_new_tokens=NEW).cpu()
            if tier == "cpu":
                assert model.executor.graph_counts == (0, 0)
            stream = model.generate_stream(prompts, batch_size=2, max_new_tokens=4,
                                           cache_tokens=12)  # fmt: skip
            streams[tier] = {req.key: toks for req, toks in stream}
    torch.testing.assert_close(outs["cpu"], outs["gpu"], rtol=0, atol=0)
    assert streams["cpu"] == streams["gpu"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_tier_streamed_micro_batches_on_cuda(tmp_path: Path) -> None:
    """On a GPU, units streamed through two slots (the budget: the slots, the smallest unit and
    a prefill chunk's activations) and the decode in one micro-batch, then micro-batches of 2
    rows (3 rows: 2 + 1): float32 tokens equal transformers'."""
    from zeroinf.api import workspace_bytes
    from zeroinf.format import DTYPES, Checkpoint

    path, want = _checkpoint_and_reference(tmp_path, "opt")
    ids, mask = tiny_prompts(64)
    ckpt = Checkpoint(path)
    sizes = [u.nbytes for u in ckpt.units]
    work = workspace_bytes(ModelConfig.from_hf(ckpt.config),
                           DTYPES[ckpt.manifest.dtype].itemsize, 2048)  # fmt: skip
    budget = 2 * max(sizes) + min(sizes) + work
    with zeroinf.load(path, device="cuda", gpu_memory=budget, kv_tier="cpu") as model:
        assert len(model.plan.streamed) > 2
        for rows in (None, 2):
            model.micro_batch = rows
            got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW).cpu()
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_generate_cli_kv_tier(
    tiny_hf: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--kv-tier reaches zeroinf.load: the host tier's results equal the device tier's; a bad
    value exits 2 with one line."""
    from zeroinf.cli.generate import main as generate_main

    ckpt = convert(tiny_hf("llama"), tmp_path / "zi", progress=False)
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "input_ids": list(range(5, 5 + n))}) + "\n"
                           for i, n in enumerate([3, 9, 5])))  # fmt: skip
    outs = {}
    for tier in ("gpu", "cpu"):
        out = tmp_path / f"out-{tier}.jsonl"
        argv = ["--model", ckpt, "--input", inp, "--output", out, "--device", "cpu",
                "--max-new-tokens", "4", "--batch-size", "2", "--quiet",
                "--kv-tier", tier]  # fmt: skip
        assert generate_main([str(a) for a in argv]) == 0
        outs[tier] = sorted(json.loads(x)["token_ids"] for x in out.read_text().splitlines())
    assert outs["cpu"] == outs["gpu"] and len(outs["cpu"]) == 3
    # "split" with the planner's batch: the same results; with a fixed batch: one line, exit 2
    out = tmp_path / "out-split.jsonl"
    split = ["--model", ckpt, "--input", inp, "--output", out, "--device", "cpu",
             "--max-new-tokens", "4", "--batch-size", "auto", "--gpu-memory", "64MiB",
             "--quiet", "--kv-tier", "split"]  # fmt: skip
    assert generate_main([str(a) for a in split]) == 0
    got = sorted(json.loads(x)["token_ids"] for x in out.read_text().splitlines())
    assert got == outs["gpu"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        generate_main([str(a) for a in argv[:-1]] + ["split"])
    assert e.value.code == 2
    assert "kv_tier='split' needs batch_size='auto'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        generate_main([str(a) for a in argv[:-1]] + ["disk"])
    assert e.value.code == 2 and "--kv-tier: invalid choice" in capsys.readouterr().err


def test_auto_plan_on_a_gpu_caps_the_host_kv_at_available_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU (no CUDA call is made with rates given) the host memory available, split
    between a group's ranks, bounds pinned units plus the host KV cache."""
    from zeroinf.engine import autoplan
    from zeroinf.format import Checkpoint

    save_tiny_hf(tmp_path / "hf", "opt", seed=5)
    ckpt = Checkpoint(convert(tmp_path / "hf", tmp_path / "zi", progress=False))
    size = ModelSize.from_checkpoint(ckpt)
    work = Workload(64, 16, max_batch=512)
    row = (64 + 16) * size.kv_token_bytes
    gpu = _kv_bound_budget(size, work)
    for world in (1, 2):
        monkeypatch.setattr(autoplan, "host_available", lambda: 40 * row)
        budgets = Budgets(gpu, None, "cpu", 2, world)
        plan = autoplan.auto_plan(ckpt, torch.device("cuda:0"), work, budgets, rates=FAST_CPU)
        assert plan.kv_tier == "cpu" and plan.gpu_bytes <= gpu
        cap = int(40 * row * (1 - autoplan.HOST_RESERVE)) // world
        assert plan.rank_streamed_bytes + plan.kv_host_bytes <= cap
        assert plan.batch >= 8
