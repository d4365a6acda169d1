"""zeroinf: run transformers larger than GPU memory, streaming layers at the PCIe limit."""

from __future__ import annotations

from zeroinf.errors import CheckpointError, ConfigError, PlanError, ReadError, ZeroInfError

__version__ = "0.1.0"
__all__ = [
    "CheckpointError", "ConfigError", "Model", "PlanError", "ReadError", "ZeroInfError", "load",
]  # fmt: skip


def __getattr__(name: str) -> object:
    # The API pulls in torch and transformers; `import zeroinf` for its errors stays light.
    if name in ("load", "Model"):
        from zeroinf import api

        return getattr(api, name)
    raise AttributeError(f"module 'zeroinf' has no attribute {name!r}")
