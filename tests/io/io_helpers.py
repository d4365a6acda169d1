"""Helpers for tests/io (a module name unique across tests/, as pytest's prepend mode needs)."""

from __future__ import annotations

import importlib

TIMEOUT = 30.0  # seconds; every wait in these tests is bounded, so a hang fails instead


def backend_available(name: str) -> bool:
    module = {"native": "zeroinf._native_aio", "libaio": "libaio"}.get(name)
    if module is None:
        return True
    try:
        importlib.import_module(module)
    except (ImportError, OSError):
        return False
    return True
