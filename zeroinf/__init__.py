"""zeroinf: run transformers larger than GPU memory, streaming layers at the PCIe limit."""

from __future__ import annotations

from zeroinf.errors import CheckpointError, ConfigError, PlanError, ReadError, ZeroInfError

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "PlanError", "ReadError", "ZeroInfError"]
