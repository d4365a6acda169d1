"""Fixtures for tests/fuzz: the examples each target ran, counted into $ZEROINF_CASES_LOG."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fuzz_helpers import COUNTS, record_cases


@pytest.fixture(scope="session", autouse=True)
def _count_examples() -> Iterator[None]:
    yield
    for name, n in sorted(COUNTS.items()):
        record_cases(name, n)
