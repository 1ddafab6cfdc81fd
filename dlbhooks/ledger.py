"""An explanation's relevance accounting (METHOD.md §6), in two types: the ledger being
built during the reverse walk (:class:`PendingEntry`: totals still tensors, absorption as
positions in a log) and the final one (:class:`LedgerEntry`: floats), which
:func:`finish_ledger` makes from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

#: A final ledger value: a float, or ``(pos, neg)`` in contrastive mode.
Value = Union[float, tuple[float, float]]


@dataclass
class LedgerEntry:
    """Relevance accounting of one processed call (METHOD.md §6)."""

    key: str
    path: str
    type: str
    relevance_out: float | tuple[float, float]
    relevance_in: float | tuple[float, float]
    absorbed: float | tuple[float, float]  # by this module's own rule
    absorbed_inside: float | tuple[float, float]  # own + everything below it
    leaf: bool


@dataclass(slots=True)
class PendingEntry:
    """One call's ledger line while the walk runs (``Engine.ledger``).

    The totals are float64 tensors ``[S]`` (one per stream; ``None`` for nothing), so
    that no value goes to the host per call.
    What the call and everything below it absorbed is the span ``log_start:log_end`` of
    the engine's log of absorptions (one item per call that absorbed, in processing
    order); the call's own absorption, if any, is the span's last item. ``log_end`` is
    ``None`` until the call is done."""

    key: str
    path: str
    type: str
    log_start: int
    relevance_out: Tensor | None = None
    relevance_in: Tensor | None = None
    absorbed: Tensor | None = None
    log_end: int | None = None
    leaf: bool = False


def finish_ledger(pending: list[PendingEntry], log_length: int,
                  contrastive: bool) -> list[LedgerEntry]:
    """The final ledger of the finished entries, in their order: totals as floats (``(pos,
    neg)`` in contrastive mode), ``absorbed_inside`` as a difference of running sums over
    the log of absorptions (``log_length`` items)."""
    return finish_ledgers(pending, log_length, contrastive, 1)[0]


def finish_ledgers(pending: list[PendingEntry], log_length: int, contrastive: bool,
                   targets: int) -> list[list[LedgerEntry]]:
    """:func:`finish_ledger` of each of ``targets`` targets explained in one pass (each
    total ``[targets × streams]``, target-major)."""
    done = [e for e in pending if e.log_end is not None]
    m = 2 if contrastive else 1
    rows = _host_values(done, m * targets)
    return [_ledger(done, [tuple(_value(v, t, m) for v in row) for row in rows], log_length,
                    contrastive) for t in range(targets)]


def _value(v: list[float] | None, t: int, m: int) -> Value:
    """Target ``t``'s value of a row of totals (``None``: nothing, 0 per stream)."""
    if v is None:
        return (0.0, 0.0) if m == 2 else 0.0
    return (v[2 * t], v[2 * t + 1]) if m == 2 else v[t]


def _ledger(done: list[PendingEntry], values: list[tuple[Value, ...]], log_length: int,
            contrastive: bool) -> list[LedgerEntry]:
    zero: Value = (0.0, 0.0) if contrastive else 0.0
    log = [zero] * log_length
    for e, (_, _, absorbed) in zip(done, values):
        if e.absorbed is not None:  # a call's own absorption is the last log item it made
            log[e.log_end - 1] = absorbed
    running = [zero]
    for f in log:
        prev = running[-1]
        running.append((prev[0] + f[0], prev[1] + f[1]) if contrastive else prev + f)
    entries = []
    for e, (out, inn, absorbed) in zip(done, values):
        a, b = running[e.log_start], running[e.log_end]
        inside = (b[0] - a[0], b[1] - a[1]) if contrastive else b - a
        # positional (key, path, type, out, in, absorbed, absorbed inside, leaf): one entry
        # per call, and keywords cost twice as much
        entries.append(LedgerEntry(e.key, e.path, e.type, out, inn, absorbed, inside, e.leaf))
    return entries


def _host_values(entries: list[PendingEntry],
                 width: int) -> list[tuple[list[float] | None, ...]]:
    """Each entry's ``(relevance_out, relevance_in, absorbed)`` as lists of ``width`` floats
    (one per stack entry), with one transfer per device instead of one per value; ``None``
    for nothing."""
    totals: dict[torch.device, list[Tensor]] = {}
    for e in entries:
        for v in (e.relevance_out, e.relevance_in, e.absorbed):
            if v is not None:
                if v.shape != (width,):
                    raise ValueError(f"{e.path or e.key}: a total of shape {tuple(v.shape)} "
                                     f"where {width} per-stream values were expected")
                totals.setdefault(v.device, []).append(v)
    floats = {dev: iter(torch.stack(ts).tolist()) for dev, ts in totals.items()}

    def value(v: Tensor | None) -> list[float] | None:
        return None if v is None else next(floats[v.device])

    # left to right, as stacked: out, in, absorbed
    return [(value(e.relevance_out), value(e.relevance_in), value(e.absorbed))
            for e in entries]
