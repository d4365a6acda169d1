"""The partition of a unit across ranks and the packing of tensors in a unit: pure functions,
checked against their invariants over many sizes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from zeroinf.format import DTYPES, layout, padded_size, partition

ALIGN = 4096


@given(pages=st.integers(1, 1 << 28), world=st.integers(1, 8))
def test_partition_covers_unit_once(pages: int, world: int) -> None:
    nbytes = pages * ALIGN  # unit files are whole pages
    padded = padded_size(nbytes, world)
    assert padded % (world * ALIGN) == 0
    assert nbytes <= padded < nbytes + world * ALIGN
    ranges = [partition(nbytes, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == padded
    for (_, stop), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert stop == start  # contiguous: no gap, no overlap
    sizes = {stop - start for start, stop in ranges}
    assert len(sizes) == 1  # equal shares, so all_gather_into_tensor can rebuild the unit
    for start, stop in ranges:
        assert start % ALIGN == 0 and stop % ALIGN == 0
    # every byte of the unit has exactly one owner
    owners = [sum(start <= b < stop for start, stop in ranges) for b in (0, nbytes - 1)]
    assert owners == [1, 1]


@pytest.mark.parametrize("world", range(1, 9))
def test_partition_small_unit_byte_by_page(world: int) -> None:
    """Page-level oracle: each page of a 13-page unit is owned by exactly one rank."""
    nbytes = 13 * ALIGN
    owned = [0] * (padded_size(nbytes, world) // ALIGN)
    for r in range(world):
        start, stop = partition(nbytes, r, world)
        for page in range(start // ALIGN, stop // ALIGN):
            owned[page] += 1
    assert owned == [1] * len(owned)


@pytest.mark.parametrize("rank,world", [(-1, 2), (2, 2), (0, 0)])
def test_partition_rejects_bad_rank(rank: int, world: int) -> None:
    with pytest.raises(ValueError):
        partition(8192, rank, world)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 70), min_size=0, max_size=3)
        ),
        min_size=1,
        max_size=12,
    )
)
def test_layout_aligned_and_disjoint(specs: list[tuple[str, list[int]]]) -> None:
    tensors = [(f"t{i}", DTYPES[d], tuple(s)) for i, (d, s) in enumerate(specs)]
    offsets, size = layout(tensors)
    assert size % ALIGN == 0 and size >= ALIGN
    end = 0
    for off, (_, dtype, shape) in zip(offsets, tensors, strict=True):
        nb = math.prod(shape) * dtype.itemsize
        assert off % ALIGN == 0
        assert off >= end  # in order, no overlap
        end = off + nb
    assert end <= size < end + ALIGN or end == 0


def test_layout_example() -> None:
    offsets, size = layout(
        [
            ("a", torch.float16, (3000,)),  # 6000 bytes -> 2 pages
            ("b", torch.float32, (1024,)),  # exactly one page
            ("c", torch.int8, (1,)),
        ]
    )
    assert offsets == [0, 8192, 12288] and size == 16384
