"""Errors raised by dlbhooks. Each names what failed and what the user can do."""

from __future__ import annotations


class DLBError(Exception):
    """Base class of every dlbhooks error."""


class UnsupportedModuleError(DLBError):
    """A recorded module has no relevance rule."""


class FunctionalGapError(DLBError):
    """Relevance reached a tensor that no recorded module produced."""


class TargetError(DLBError, ValueError):
    """A target, task or seed does not fit the model output."""


class NonFiniteError(DLBError, ValueError):
    """An input or recorded activation holds NaN or inf."""


class RecordModifiedError(DLBError):
    """A recorded tensor was modified in place after it was recorded."""


class TraceError(DLBError):
    """The tape is empty or was used the wrong way."""


class OffloadError(DLBError):
    """A weight is on the meta device and nothing can load it."""
