"""Byte sizes: parsing user budgets ("12GiB") and alignment arithmetic."""

from __future__ import annotations

import re

from zeroinf.errors import ConfigError

ALIGN = 4096
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def align_up(n: int, alignment: int = ALIGN) -> int:
    return (n + alignment - 1) // alignment * alignment


def parse_bytes(value: int | str | None, what: str = "size") -> int | None:
    """Parse a budget: an int of bytes or a string such as "12GiB", "512 MiB", "1.5GB"."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        if value is not None and value < 0:
            raise ConfigError(f"{what}: negative size {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what}: cannot parse size {value!r} (use bytes or e.g. '12GiB')")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError
