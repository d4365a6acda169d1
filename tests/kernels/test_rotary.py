from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, close, randn

from kernels import apply_rotary_, apply_rotary_ref


def rope_tables(B: int, S: int, R: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, R] as the models build them: cat(angles, angles), per-row positions."""
    pos = torch.arange(S)[None, :] + torch.arange(B)[:, None] * 3  # rows at different offsets
    inv = 1.0 / (10000.0 ** (torch.arange(0, R, 2).float() / R))
    ang = pos[..., None].float() * inv  # [B, S, R/2]
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


def oracle(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """float64 rotate_half on x [B, S, H, D]."""
    R = cos.shape[-1]
    x = x.double()
    c, s = cos.double()[:, :, None], sin.double()[:, :, None]
    x1, x2 = x[..., : R // 2], x[..., R // 2 : R]
    rot = torch.cat(
        (
            x1 * c[..., : R // 2] - x2 * s[..., : R // 2],
            x2 * c[..., R // 2 :] + x1 * s[..., R // 2 :],
        ),
        dim=-1,
    )
    return torch.cat((rot, x[..., R:]), dim=-1)


# (B, S, H, Hkv, D, R): full and partial rotary, GQA, head dims that are not powers of two,
# half-widths (R/2 = 12, 10, 40) that are not powers of two either.
SHAPES = [
    (2, 3, 4, 4, 16, 16),
    (1, 7, 6, 2, 40, 24),
    (3, 1, 5, 1, 80, 80),
    (2, 5, 3, 3, 64, 20),
    (1, 33, 2, 1, 128, 128),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["BSHD", "BHSD"])
def test_rotary_matches_reference_and_oracle(gen, dtype, shape, layout):
    B, S, H, Hkv, D, R = shape
    if layout == "BSHD":
        q, k = randn(B, S, H, D, gen=gen, dtype=dtype), randn(B, S, Hkv, D, gen=gen, dtype=dtype)
        qv, kv = q, k
    else:  # the models' [B, H, S, D], passed as a transposed view
        q, k = randn(B, H, S, D, gen=gen, dtype=dtype), randn(B, Hkv, S, D, gen=gen, dtype=dtype)
        qv, kv = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = rope_tables(B, S, R, dtype)
    want_q, want_k = oracle(qv, cos, sin), oracle(kv, cos, sin)
    q_ref, k_ref = qv.clone(), kv.clone()
    apply_rotary_ref(q_ref, k_ref, cos, sin)
    before_q = qv.clone()
    out = apply_rotary_(qv, kv, cos, sin)
    assert out[0] is qv and out[1] is kv
    assert torch.equal(qv[..., R:], before_q[..., R:])  # channels past R untouched
    close(qv, q_ref, dtype)
    close(kv, k_ref, dtype)
    close(qv, want_q, dtype)
    close(kv, want_k, dtype)


def test_rotation_preserves_pair_norms(gen):
    """A rotation keeps |(x_i, x_{i+R/2})| for every pair: an oracle independent of the formula."""
    q, k = randn(2, 4, 3, 48, gen=gen), randn(2, 4, 1, 48, gen=gen)
    cos, sin = rope_tables(2, 4, 48, torch.float32)
    pairs = q[..., :24] ** 2 + q[..., 24:] ** 2
    apply_rotary_(q, k, cos, sin)
    torch.testing.assert_close(q[..., :24] ** 2 + q[..., 24:] ** 2, pairs, rtol=1e-5, atol=1e-5)


def test_broadcast_table(gen):
    """A [1, S, R] table expanded over the batch (stride 0) gives the same as a full table."""
    q, k = randn(3, 5, 2, 32, gen=gen), randn(3, 5, 2, 32, gen=gen)
    cos, sin = rope_tables(1, 5, 32, torch.float32)
    q2, k2 = q.clone(), k.clone()
    apply_rotary_(q, k, cos.expand(3, 5, 32), sin.expand(3, 5, 32))
    apply_rotary_ref(q2, k2, cos.expand(3, 5, 32), sin.expand(3, 5, 32))
    close(q, q2, torch.float32)
    close(k, k2, torch.float32)


def test_invalid(gen):
    q, k = randn(1, 2, 2, 16, gen=gen), randn(1, 2, 2, 16, gen=gen)
    cos, sin = rope_tables(1, 2, 16, torch.float32)
    with pytest.raises(AssertionError, match="unit stride"):
        qt = randn(1, 2, 16, 16, gen=gen).transpose(2, 3)  # D strided
        apply_rotary_(qt, randn(1, 2, 16, 16, gen=gen), cos, sin)
    with pytest.raises(AssertionError, match="rotary dim"):
        apply_rotary_(q, k, cos[..., :15], sin[..., :15])
    with pytest.raises(AssertionError, match="dtype"):
        apply_rotary_(q, k.half(), cos, sin)
