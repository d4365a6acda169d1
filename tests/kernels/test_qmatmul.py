from __future__ import annotations

import sys

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, REL, close, randn, rel_err

from kernels import QConfig, dequantize, qmatmul, qmatmul_ref, quantize
from kernels.qmatmul import dequantize_into

SCHEMES = [(4, "sym"), (4, "asym"), (8, "sym")]


def make_weight(N: int, K: int, bits: int, scheme: str, G: int, gen: torch.Generator):
    w = torch.randn(N, K, generator=gen) * (torch.rand(N, 1, generator=gen) + 0.1)
    return {k: v.to(DEVICE) for k, v in quantize(w, bits, G, scheme).items()}


def oracle(x: torch.Tensor, q: dict, bias: torch.Tensor | None) -> torch.Tensor:
    """float64: x @ dequantize(W).T + bias."""
    y = x.double() @ dequantize(**q, dtype=torch.float64).T
    return y if bias is None else y + bias.double()


# (M, N, K, G, config): decode-like M with split-K (ragged and empty splits too), several
# groups per step, prefill-like tiles, N not a multiple of BLOCK_N, M not one of BLOCK_M, the
# heuristic.
CASES = [
    (1, 33, 192, 64, None),
    (3, 70, 320, 32, QConfig(16, 32, GROUPS=2, SPLIT_K=3)),  # 10 groups: steps 2+2+1
    (5, 96, 512, 128, QConfig(16, 64, GROUPS=1, SPLIT_K=3)),
    (2, 40, 256, 32, QConfig(16, 16, GROUPS=2, SPLIT_K=5)),  # 4 steps over 5 splits: one empty
    (37, 50, 192, 64, QConfig(32, 32)),
    (70, 24, 256, 64, QConfig(64, 16, GROUPS=2, GROUP_M=2)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,scheme", SCHEMES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}g{c[3]}")
def test_qmatmul_matches_float64(gen, dtype, bits, scheme, case):
    M, N, K, G, cfg = case
    q = make_weight(N, K, bits, scheme, G, gen)
    x = randn(M, K, gen=gen, dtype=dtype)
    bias = randn(N, gen=gen, dtype=dtype) if M % 2 else None
    y = qmatmul(x, **q, bias=bias, config=cfg)
    assert y.shape == (M, N) and y.dtype == dtype
    want = oracle(x, q, bias)
    assert rel_err(y, want) < REL[dtype]
    # Elementwise, relative to the row's scale: every output element was written and is right.
    row = want.abs().amax(-1, keepdim=True)
    assert ((y.double() - want).abs() <= REL[dtype] * 2 * row).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,scheme", SCHEMES)
@pytest.mark.parametrize("path", ["fused", "dequant"])
def test_prefill_paths(gen, dtype, bits, scheme, path, monkeypatch):
    """Many rows: the fused kernel with its default (128 x 128) tiles, and dequantize + matmul
    over several weight slabs (CHUNK_ELEMS shrunk so that N = 300 takes three, one ragged)."""
    monkeypatch.setattr(sys.modules["kernels.qmatmul"], "CHUNK_ELEMS", 128 * 256)
    q = make_weight(300, 256, bits, scheme, 64, gen)
    x = randn(130, 256, gen=gen, dtype=dtype)
    bias = randn(300, gen=gen, dtype=dtype)
    y = qmatmul(x, **q, bias=bias, path=path)
    assert rel_err(y, oracle(x, q, bias)) < REL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,scheme", SCHEMES)
def test_dequantize_into_matches_reference(gen, dtype, bits, scheme):
    q = make_weight(70, 192, bits, scheme, 64, gen)
    out = torch.full((30, 192), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
    z = q["zeros"][:, 20:50] if "zeros" in q else None
    dequantize_into(out, q["qweight"][20:50], q["scales"][:, 20:50], z)  # a row slice
    close(out, dequantize(**q, dtype=dtype)[20:50], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_path_agrees(gen, dtype):
    """qmatmul_ref (the CPU path the models take) gives the same result within rounding."""
    q = make_weight(48, 256, 4, "asym", 64, gen)
    x = randn(2, 3, 256, gen=gen, dtype=dtype)  # leading dims are kept
    y = qmatmul(x, **q)
    assert y.shape == (2, 3, 48)
    y_ref = qmatmul_ref(x, **q)
    assert rel_err(y, y_ref) < 2 * REL[dtype]
    close(qmatmul(x.float(), **q), qmatmul_ref(x.float(), **q), torch.float32)


def test_invalid(gen):
    q = make_weight(16, 128, 4, "sym", 64, gen)
    x = randn(2, 128, gen=gen)
    with pytest.raises(AssertionError, match="last dim"):
        qmatmul(randn(2, 64, gen=gen), **q)
    with pytest.raises(AssertionError, match="contiguous"):
        qmatmul(randn(128, 2, gen=gen).t(), **q)
    with pytest.raises(AssertionError, match="bias"):
        qmatmul(x, **q, bias=randn(15, gen=gen))
    with pytest.raises(AssertionError, match="GROUPS"):
        qmatmul(x, **q, config=QConfig(16, 16, GROUPS=4))  # 2 groups
    q16 = {k: v.to(DEVICE) for k, v in quantize(torch.randn(16, 128), 4, 16).items()}
    with pytest.raises(AssertionError, match="groups of >= 32"):
        qmatmul(x, **q16)


# Decode split-K: (M, N, K, G, GROUPS, SPLIT_K). Odd group counts (5, 7, 9), N and M not
# powers of two, ragged splits, a split with no step (5 steps over 4 splits: 2+2+1+0), more
# row tiles than one (M = 20 with BLOCK_M 16), and splits up to one step each.
SPLIT_CASES = [
    (1, 100, 320, 64, 1, 4),  # 5 groups: 2+2+1+0
    (3, 33, 448, 64, 1, 3),  # 7 groups: 3+3+1
    (16, 70, 576, 64, 1, 9),  # 9 groups: one per split
    (5, 96, 512, 32, 2, 3),  # 16 groups, 8 steps: 3+3+2
    (20, 40, 384, 128, 1, 2),  # 3 groups, two row tiles
]


@pytest.mark.parametrize("reduce", ["last", "sum"])
@pytest.mark.parametrize("bits,scheme", SCHEMES)
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}s{c[5]}")
def test_split_k_reductions(gen, reduce, bits, scheme, case):
    """Both split-K reductions against float64, every element written, deterministic across
    calls (the counters reset themselves), and bit-identical to each other."""
    M, N, K, G, groups, split = case
    dtype = torch.bfloat16 if M % 2 else torch.float16
    q = make_weight(N, K, bits, scheme, G, gen)
    x = randn(M, K, gen=gen, dtype=dtype)
    bias = randn(N, gen=gen, dtype=dtype) if N % 2 == 0 else None
    cfg = QConfig(16, 32, GROUPS=groups, SPLIT_K=split, REDUCE=reduce)
    y = qmatmul(x, **q, bias=bias, config=cfg)
    want = oracle(x, q, bias)
    assert rel_err(y, want) < REL[dtype]
    row = want.abs().amax(-1, keepdim=True)
    assert ((y.double() - want).abs() <= REL[dtype] * 2 * row).all()
    for _ in range(2):  # same bits on every call
        assert torch.equal(qmatmul(x, **q, bias=bias, config=cfg), y)
    other = QConfig(
        16, 32, GROUPS=groups, SPLIT_K=split, REDUCE="sum" if reduce == "last" else "last"
    )
    assert torch.equal(qmatmul(x, **q, bias=bias, config=other), y)  # same summation order
    for buf in sys.modules["kernels.qmatmul"]._SEMAPHORES.get(x.device, []):
        assert not buf.any()  # every counter back at zero


def test_semaphores_grow_and_stay(gen, monkeypatch):
    """A larger counter buffer is added beside the old one (CUDA graphs keep its address)."""
    mod = sys.modules["kernels.qmatmul"]
    monkeypatch.setattr(mod, "_SEMAPHORES", {})
    monkeypatch.setattr(mod, "SEMAPHORE_MIN", 2)
    q = make_weight(96, 256, 4, "sym", 64, gen)
    x = randn(2, 256, gen=gen)
    for bn in (32, 16):  # 3 then 6 output tiles
        y = qmatmul(x, **q, config=QConfig(16, bn, SPLIT_K=4, REDUCE="last"))
        assert rel_err(y, oracle(x, q, None)) < REL[torch.float32]
    bufs = mod._SEMAPHORES[x.device]
    assert [b.numel() for b in bufs] == [3, 6] and not any(b.any() for b in bufs)


# The decode shapes of tools/bench_kernels.py (Llama-2-13B, OPT-30B; fused qkv included).
DECODE_SHAPES = [
    (5120, 5120),
    (13824, 5120),
    (5120, 13824),
    (15360, 5120),
    (7168, 7168),
    (28672, 7168),
    (7168, 28672),
    (21504, 7168),
]


@pytest.mark.parametrize("N,K", DECODE_SHAPES)
def test_pick_config_decode(N, K):
    from kernels.qmatmul import SPLIT_REDUCE, pick_config

    for M in (1, 4, 8, 16, 32):
        cfg = pick_config(M, N, K, 64, 4, torch.device("cpu"))
        assert cfg.SPLIT_K > 1 and cfg.REDUCE == SPLIT_REDUCE == "last"
        assert (K // 64) % cfg.GROUPS == 0
    assert pick_config(512, N, K, 64, 4, torch.device("cpu")).SPLIT_K == 1


def test_invalid_reduce(gen):
    q = make_weight(16, 256, 4, "sym", 64, gen)
    with pytest.raises(AssertionError, match="REDUCE"):
        qmatmul(randn(1, 256, gen=gen), **q, config=QConfig(16, 16, SPLIT_K=2, REDUCE="atomic"))
