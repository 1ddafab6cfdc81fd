"""One line of an explanation's relevance accounting (:class:`LedgerEntry`, METHOD.md §6)."""

from __future__ import annotations

from dataclasses import dataclass


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
