"""Activation and gated activation-multiply: act(gate) * up in one pass (SwiGLU, GeGLU).

`act` names follow zeroinf.models.config.ACTIVATIONS: "silu", "gelu" (exact, erf),
"gelu_tanh" (tanh approximation), "relu". Math is float32; as in the torch path,
act(gate) is rounded to the input dtype before the multiply, then the product is rounded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._common import cdiv, check, check_device, check_float

ACTS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
BLOCK = 1024


@triton.jit
def _act(x, ACT: tl.constexpr):
    """x float32 -> act(x) float32."""
    if ACT == 0:
        # x * sigmoid(x) with exp of a non-positive argument only (no overflow).
        e = tl.exp(-tl.abs(x))
        y = x * tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 2:
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        # tanh(z) = sign(z) (1 - e) / (1 + e), e = exp(-2|z|) <= 1 (Triton 3.6 has no tanh).
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        y = 0.5 * x * (1.0 + tl.where(z >= 0, t, -t))
    else:
        y = tl.maximum(x, 0.0)
    return y


@triton.jit
def _act_mul_kernel(
    G,  # [M, N] rows of gate (row stride sg, unit column stride)
    U,  # [M, N] rows of up, or a dummy
    Y,  # [M, N] contiguous output
    N,
    sg,
    su,
    ACT: tl.constexpr,
    HAS_UP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * sg + cols, mask=mask, other=0.0).to(tl.float32)
    y = _act(g, ACT)
    if HAS_UP:
        u = tl.load(U + row * su + cols, mask=mask, other=0.0).to(tl.float32)
        y = y.to(Y.dtype.element_ty).to(tl.float32) * u
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)


def _launch(g: torch.Tensor, u: torch.Tensor | None, act: str) -> torch.Tensor:
    """g, u: 2-D [M, N] views with unit column stride -> new contiguous [M, N]."""
    check(act in ACTS, f"act: {act!r} not one of {sorted(ACTS)}")
    check_device(_act_mul_kernel, g, u)
    M, N = g.shape
    y = torch.empty((M, N), dtype=g.dtype, device=g.device)
    if M * N == 0:
        return y
    _act_mul_kernel[(M, cdiv(N, BLOCK))](
        g,
        u if u is not None else g,
        y,
        N,
        g.stride(0),
        u.stride(0) if u is not None else 0,
        ACT=ACTS[act],
        HAS_UP=u is not None,
        BLOCK=BLOCK,
        num_warps=4,
    )
    return y


def act_mul(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(gate) * up; gate, up [..., N] contiguous, same shape and dtype -> [..., N]."""
    check_float("gate", gate)
    check(up.shape == gate.shape, f"up: shape {tuple(up.shape)} != gate {tuple(gate.shape)}")
    check(up.dtype == gate.dtype, f"up: dtype {up.dtype} != gate {gate.dtype}")
    check(gate.is_contiguous() and up.is_contiguous(), "gate and up must be contiguous")
    N = gate.shape[-1]
    return _launch(gate.view(-1, N), up.view(-1, N), act).view(gate.shape)


def act_mul_fused(gate_up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """act(gate) * up from gate_up [..., 2N] = cat(gate, up) (a fused gate_up projection's output,
    gate first) -> [..., N]. Reads the two halves in place."""
    check_float("gate_up", gate_up)
    check(gate_up.is_contiguous(), "gate_up must be contiguous")
    N2 = gate_up.shape[-1]
    check(N2 % 2 == 0, f"gate_up: last dim {N2} is odd")
    x = gate_up.view(-1, N2)
    y = _launch(x[:, : N2 // 2], x[:, N2 // 2 :], act)
    return y.view(*gate_up.shape[:-1], N2 // 2)


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    """act(x); x [..., N] contiguous -> new [..., N]."""
    check_float("x", x)
    check(x.is_contiguous(), "x must be contiguous")
    N = x.shape[-1]
    return _launch(x.view(-1, N), None, act).view(x.shape)


def activation_ref(x: torch.Tensor, act: str) -> torch.Tensor:
    """Torch reference (zeroinf.models.layers.activation)."""
    check(act in ACTS, f"act: {act!r} not one of {sorted(ACTS)}")
    if act == "silu":
        return F.silu(x)
    if act == "gelu":
        return F.gelu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


def act_mul_ref(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    return activation_ref(gate, act) * up


def act_mul_fused_ref(gate_up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return activation_ref(gate, act) * up
