from __future__ import annotations

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, REL, randn, rel_err

from kernels import decode_attention, decode_attention_ref
from kernels.attention import decode_attention_oracle


def left_padding(B: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """[B, length] bool: row b starts with a random number of padded (False) keys."""
    pad = torch.randint(0, length, (B,), generator=gen)
    pad[0] = 0
    return (torch.arange(length)[None, :] >= pad[:, None]).to(DEVICE)


# (B, H, Hkv, D, T_max, length, splits): MHA and GQA, head dims 64/80/32, lengths that are not
# multiples of the 64-key block, a single key, key chunks (splits) forced and heuristic.
CASES = [
    (2, 4, 4, 64, 100, 77, None),
    (3, 8, 2, 80, 300, 290, 3),
    (1, 6, 1, 32, 70, 1, None),
    (2, 12, 3, 64, 200, 200, 2),
    (1, 32, 8, 32, 130, 129, 5),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_matches_float64(gen, dtype, case, masked):
    B, H, Hkv, D, T, L, splits = case
    q = randn(B, H, 1, D, gen=gen, dtype=dtype)
    k = randn(B, Hkv, T, D, gen=gen, dtype=dtype)
    v = randn(B, Hkv, T, D, gen=gen, dtype=dtype)
    k[:, :, L:] = float("nan")  # past the valid length: must never reach the result
    v[:, :, L:] = float("nan")
    mask = left_padding(B, L, gen) if masked else None
    o = decode_attention(q, k, v, L, mask, splits=splits)
    assert o.shape == (B, H, 1, D) and o.dtype == dtype
    want = decode_attention_oracle(q, k, v, L, mask)
    assert rel_err(o, want) < REL[dtype]
    assert rel_err(decode_attention_ref(q, k, v, L, mask), want) < REL[dtype]  # same oracle


def test_strided_query_and_cache_views(gen):
    """q as the models make it ([B, S, H, D] transposed) and a cache narrower than its buffer."""
    B, H, Hkv, D = 2, 4, 2, 64
    q = randn(B, 1, H, D, gen=gen).transpose(1, 2)  # [B, H, 1, D] view
    big_k, big_v = randn(B, 2 * Hkv, 90, D, gen=gen), randn(B, 2 * Hkv, 90, D, gen=gen)
    k, v = big_k[:, ::2], big_v[:, ::2]  # strided head dimension
    mask = left_padding(B, 90, gen)
    o = decode_attention(q, k, v, 81, mask)
    assert rel_err(o, decode_attention_oracle(q, k, v, 81, mask)) < REL[torch.float32]


def test_fully_masked_row_gives_zeros(gen):
    q, k, v = (
        randn(2, 2, 1, 32, gen=gen),
        randn(2, 2, 50, 32, gen=gen),
        randn(2, 2, 50, 32, gen=gen),
    )
    mask = torch.ones(2, 50, dtype=torch.bool, device=q.device)
    mask[1] = False
    for splits in (1, 3):
        o = decode_attention(q, k, v, 50, mask, splits=splits)
        assert torch.equal(o[1], torch.zeros_like(o[1]))
        assert rel_err(o[0], decode_attention_oracle(q, k, v, 50, mask)[0]) < 1e-5


def test_scale_and_invalid(gen):
    q, k, v = (
        randn(1, 4, 1, 16, gen=gen),
        randn(1, 2, 20, 16, gen=gen),
        randn(1, 2, 20, 16, gen=gen),
    )
    o = decode_attention(q, k, v, 20, scale=1.0)
    assert rel_err(o, decode_attention_oracle(q, k, v, 20, scale=1.0)) < 1e-5
    with pytest.raises(AssertionError, match="multiple"):
        decode_attention(randn(1, 3, 1, 16, gen=gen), k, v, 20)
    with pytest.raises(AssertionError, match="length"):
        decode_attention(q, k, v, 21)
    with pytest.raises(AssertionError, match="key_mask"):
        decode_attention(q, k, v, 20, torch.ones(1, 19, dtype=torch.bool))
    with pytest.raises(AssertionError, match="dtypes"):
        decode_attention(q, k.half(), v.half(), 20)
