"""One exception hierarchy. Every message is one line naming the file, tensor, record or flag."""

from __future__ import annotations


class ZeroInfError(Exception):
    """Base of every error zeroinf raises on bad input or a failed operation."""


class CheckpointError(ZeroInfError):
    """A checkpoint (source or zeroinf format) is missing, malformed or corrupt."""


class ConfigError(ZeroInfError):
    """A model config or option asks for something zeroinf does not implement."""


class PlanError(ZeroInfError):
    """The budgets cannot hold what the run needs."""


class ReadError(ZeroInfError):
    """An I/O read failed; the message names the file and offset."""
