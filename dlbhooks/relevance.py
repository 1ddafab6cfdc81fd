"""Relevance values: one tensor (default mode) or two non-negative streams (contrastive).

Rules that do not cross streams are written for one tensor; :func:`rmap` applies them to
each stream. Only the weighted-sum rule (``rules/core.py``) mixes the two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Union

import torch
from torch import Tensor


class Streams(NamedTuple):
    """The two streams of contrastive mode; the explanation is ``pos - neg``."""

    pos: Tensor
    neg: Tensor


Rel = Union[Tensor, Streams]


def rmap(fn: Callable[..., Tensor], *rels: Rel) -> Rel:
    """Apply ``fn`` to each stream (or to the single tensor) of one or more relevances."""
    if isinstance(rels[0], Streams):
        return Streams(fn(*(r.pos for r in rels)), fn(*(r.neg for r in rels)))
    return fn(*rels)


def rmap_multi(fn: Callable[[Tensor], list], rel: Rel) -> list:
    """Apply ``fn`` returning a list of tensors to each stream, re-pairing the results."""
    if isinstance(rel, Streams):
        pos, neg = fn(rel.pos), fn(rel.neg)
        return [None if p is None else Streams(p, n) for p, n in zip(pos, neg)]
    return fn(rel)


def rsum(rel: Rel | None) -> Rel | None:
    """Total of a relevance (per stream) as float64 scalars."""
    if rel is None:
        return None
    return rmap(total64, rel)


def total64(t: Tensor) -> Tensor:
    """Float64 0-d total of ``t`` (``t`` itself if it already is one). The sum runs in
    ``t``'s dtype: a float64 accumulator is several times slower on large tensors."""
    if t.requires_grad:
        t = t.detach()
    if t.dim() == 0 and t.dtype == torch.float64:
        return t
    return t.sum().double()


def radd(a: Rel | None, b: Rel | None) -> Rel | None:
    """Sum of two relevances; ``None`` stands for zero."""
    if a is None:
        return b
    if b is None:
        return a
    return rmap(torch.add, a, b)


def net(rel: Rel) -> Tensor:
    """The explanation map: the tensor itself, or ``pos - neg``."""
    return rel.pos - rel.neg if isinstance(rel, Streams) else rel


def to_float(rel: Rel | None) -> float | tuple[float, float]:
    """Scalar relevance as a float, or ``(pos, neg)`` in contrastive mode."""
    if rel is None:
        return 0.0
    if isinstance(rel, Streams):
        return float(rel.pos), float(rel.neg)
    return float(rel)


def all_finite(t: Tensor) -> bool:
    """No NaN or inf in ``t``: one reduction when the sum is finite (NaN and inf always
    reach it), the element-wise test only when it is not (it may just overflow)."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def has_nan(t: Tensor) -> bool:
    """Any NaN in ``t`` (one reduction when the sum is finite)."""
    return not math.isfinite(float(t.sum())) and bool(torch.isnan(t).any())
