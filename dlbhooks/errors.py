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


class RecordReleasedError(TraceError):
    """A rule or a second explanation read recorded tensors that an explanation with
    ``release=True`` had already freed."""


class SavedFileError(DLBError, ValueError):
    """A file is not a saved dlbhooks result of the kind being loaded."""


class OffloadError(DLBError):
    """A weight is on the meta device and nothing can load it."""


class OutOfMemoryError(DLBError, MemoryError):
    """The device ran out of memory while recording or explaining; says which policy to try."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is a device or host allocation failure."""
    import torch

    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def memory_advice(where: str, storage: str, record_bytes: int | None) -> str:
    held = f"the records hold {record_bytes / 2**20:.1f} MiB" if record_bytes is not None else ""
    return (
        f"out of memory {where} ({held}{', ' if held else ''}record storage: {storage}). "
        "Try: dlb.trace(model, storage='cpu') to keep records in CPU memory (loaded back one "
        "layer at a time), storage='bf16' (or 'cpu+bf16') to halve them, fewer tokens or "
        "batch rows per explanation, or a device_map that offloads weights; "
        "dlb.estimate_memory(model, seq_len) predicts the record size before running."
    )
