"""Fixtures for tests/io: files of random bytes (the oracle) and the backends this machine has."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from io_helpers import backend_available

from zeroinf.io import BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if not backend_available(request.param):
        pytest.skip(f"io backend {request.param!r} is not available here")
    return request.param


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[..., tuple[Path, bytes]]:
    """make_file(nbytes, folder=tmp_path) -> (path, its bytes)."""

    def make(nbytes: int, folder: Path | None = None) -> tuple[Path, bytes]:
        data = os.urandom(nbytes)
        path = (folder or tmp_path) / f"unit-{nbytes}.bin"
        path.write_bytes(data)
        return path, data

    return make
