"""Scratch buffers reused for the length of one reverse pass.

Rules need large temporaries they use up within their call: the attention rule a
[queries × keys] block per chunk and head, whose size changes from chunk to chunk; a
weighted sum its denominators and ``|W|``. Allocated afresh, each one is new memory
from the operating system (large blocks are mapped and unmapped on every allocation)
and the page faults of touching it cost as much as the arithmetic.
Inside :func:`session` (the engine opens one per explanation), :func:`buffer` hands out
the same block for the same key, grown when a larger one is asked for, and everything is
released when the session ends. Outside a session :func:`buffer` is ``torch.empty``.

A key names one temporary of one rule: a buffer is valid until the next call with the
same key, so a rule must not hold it across calls into other rules.

:func:`memo` keeps, for the same session, what a rule derives from a tensor that several
records in a row share (the attention mask every layer of a transformer receives, the
input of the query, key and value projections).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch
from torch import Tensor

from .storage import version_of

__all__ = ["buffer", "memo", "session"]

T = TypeVar("T")

_POOL: ContextVar[dict | None] = ContextVar("dlbhooks_scratch", default=None)
#: bytes the ``chunked`` buffers of the current (or last) session hold, and the most they
#: held together (for :func:`~dlbhooks.memory.estimate_memory`, which scales them with a
#: chunk of queries × keys; other buffers count like any temporary of the record)
HELD_BYTES: list[int] = [0]
PEAK_BYTES: list[int] = [0]


@contextmanager
def session() -> Iterator[None]:
    """Reuse :func:`buffer`'s blocks until the block ends (nested sessions share the
    outer one); the blocks are freed at its end."""
    if _POOL.get() is not None:
        yield
        return
    token = _POOL.set({})
    HELD_BYTES[0] = PEAK_BYTES[0] = 0
    try:
        yield
    finally:
        _POOL.reset(token)
        HELD_BYTES[0] = 0  # the blocks go with the pool


def buffer(key: str, shape: tuple[int, ...], dtype: torch.dtype,
           device: torch.device, *, chunked: bool = False) -> Tensor:
    """An uninitialised contiguous tensor of ``shape``: within a :func:`session`, a view of
    the block kept under ``(key, dtype, device)`` (grown as needed). ``chunked``: its size
    goes with a chunk of queries × keys (attention), not with the tokens (counted in
    :data:`HELD_BYTES`)."""
    pool = _POOL.get()
    if pool is None:
        return torch.empty(shape, dtype=dtype, device=device)
    n = math.prod(shape)
    slot = (key, dtype, torch.device(device), chunked)
    block = pool.get(slot)
    if block is None or block.numel() < n:
        pool.pop(slot, None)  # free the smaller block before taking the larger
        block = pool[slot] = torch.empty(n, dtype=dtype, device=device)
        HELD_BYTES[0] = sum(b.nbytes for k, b in pool.items() if k[0] != "memo" and k[3])
        PEAK_BYTES[0] = max(PEAK_BYTES[0], HELD_BYTES[0])
    return block[:n].view(shape)


def memo(key: str, of: Tensor, make: Callable[[], T]) -> T:
    """``make()``, kept for the session under ``key`` while it is asked for the same
    tensor ``of`` (the same object, unmodified since: its version is checked); asked for
    another tensor, it computes and keeps the new value instead (one value per key, so
    that a value as large as ``of`` is not held longer than the calls that share it)."""
    pool = _POOL.get()
    if pool is None:
        return make()
    version = version_of(of)
    slot = ("memo", key)
    hit = pool.get(slot)
    if hit is not None and hit[0] is of and hit[1] == version:
        return hit[2]
    pool.pop(slot, None)  # free the previous value first
    value = make()
    pool[slot] = (of, version, value)  # holding ``of`` keeps its id from being reused
    return value
