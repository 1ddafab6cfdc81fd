"""Tensor arithmetic shared by rules: guarded division, broadcasting checks, reductions."""

from __future__ import annotations

import torch
from torch import Tensor


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0 (one division, one clean-up pass)."""
    return torch.nan_to_num_(num / den, nan=0.0, posinf=0.0, neginf=0.0)


def broadcasts_into(shape, target) -> bool:
    """Does a tensor of ``shape`` broadcast to exactly ``target`` (so that an in-place op
    on a ``target``-shaped tensor can take it)? A cheap ``torch.broadcast_shapes`` check."""
    n, m = len(shape), len(target)
    if n > m:
        return False
    return all(a == 1 or a == b for a, b in zip(shape, tuple(target)[m - n:]))


def nonzero_along(t: Tensor, dim) -> Tensor:
    """Bool: does ``t`` have a non-zero entry along ``dim`` (an int or tuple of dims)? Two
    fast min/max reductions (``count_nonzero`` with a dim is several times slower)."""
    return (t.amax(dim) > 0) | (t.amin(dim) < 0)


def fits(out: Tensor, other: Tensor) -> bool:
    """Can ``out ∘ other`` (element-wise, broadcasting) be written into ``out`` with the
    shape and dtype the out-of-place op would give?"""
    return (broadcasts_into(other.shape, out.shape)
            and (other.dtype == out.dtype or torch.result_type(out, other) == out.dtype))


def nonneg_div(num: Tensor, den: Tensor, own: bool = False, positive: bool = False,
               out: Tensor | None = None) -> Tensor:
    """``num / den`` with 0 where ``den == 0`` (``den`` is never negative). ``own``: ``den``
    is a temporary of the caller and may be overwritten with the result; else ``out``, if
    given, receives it. ``positive``: the caller knows ``den > 0`` everywhere, so there is
    nothing to clean up (one pass less)."""
    if own and fits(den, num):
        s = torch.div(num, den, out=den)
    elif out is not None:
        s = torch.div(num, den, out=out)
    else:
        s = num / den
    return s if positive else torch.nan_to_num_(s, nan=0.0, posinf=0.0, neginf=0.0)


def reduce_stacked(R: Tensor, shape) -> Tensor:
    """``R`` ([S, *broadcast shape]) summed over the axes along which an operand of
    ``shape`` was broadcast: ``[S, *shape]``."""
    shape = tuple(shape)
    pad = (1,) * (R.dim() - 1 - len(shape))
    return reduce_to(R, (R.shape[0], *pad, *shape)).reshape(R.shape[0], *shape)


def reduce_to(t: Tensor, shape) -> Tensor:
    """Sum ``t`` over the axes along which a tensor of ``shape`` was broadcast to it."""
    shape = tuple(shape)
    if tuple(t.shape) == shape:
        return t
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t
