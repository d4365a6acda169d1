from __future__ import annotations

import math

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, close, randn

from kernels import (
    act_mul,
    act_mul_fused,
    act_mul_fused_ref,
    act_mul_ref,
    activation,
    activation_ref,
)

ACTS = ["silu", "gelu", "gelu_tanh", "relu"]
SIZES = [1, 100, 1024, 3001]  # the block is 1024 columns: below, at, and past a multiple


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("N", SIZES)
def test_act_mul_and_activation(gen, dtype, act, N):
    g = randn(3, N, gen=gen, dtype=dtype) * 3  # reach the tails of the activations
    u = randn(3, N, gen=gen, dtype=dtype)
    close(act_mul(g, u, act), act_mul_ref(g, u, act), dtype)
    close(activation(g, act), activation_ref(g, act), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_fused_gate_up(gen, dtype, act):
    gu = randn(2, 3, 2 * 1500, gen=gen, dtype=dtype)
    y = act_mul_fused(gu, act)
    assert y.shape == (2, 3, 1500)
    close(y, act_mul_fused_ref(gu, act), dtype)


def test_float64_oracle_and_extremes(gen):
    """float32 against the formulas in float64, including large |x| (saturation, no NaN)."""
    tails = torch.tensor([-1e4, -100.0, -30.0, 30.0, 100.0], device=DEVICE)
    x = torch.cat([randn(1000, gen=gen) * 4, tails])
    xd = x.double()
    want = {
        "silu": xd * torch.sigmoid(xd),
        "gelu": 0.5 * xd * (1 + torch.erf(xd / math.sqrt(2))),
        "gelu_tanh": 0.5 * xd * (1 + torch.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd**3))),
        "relu": xd.clamp(min=0),
    }
    for act, ref in want.items():
        y = activation(x, act)
        assert torch.isfinite(y).all(), act
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6, msg=act)


def test_invalid(gen):
    g = randn(4, 8, gen=gen)
    with pytest.raises(AssertionError, match="act"):
        activation(g, "tanh")
    with pytest.raises(AssertionError, match="shape"):
        act_mul(g, randn(4, 9, gen=gen))
    with pytest.raises(AssertionError, match="contiguous"):
        act_mul(g.t(), g.t())
    with pytest.raises(AssertionError, match="odd"):
        act_mul_fused(randn(2, 7, gen=gen))
