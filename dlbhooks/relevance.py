"""Relevance values: one tensor whose leading axis stacks what is explained at once.

A relevance on a tensor ``x`` has shape ``[S, *x.shape]``, ``S = targets × streams``: one
entry per stream of each target explained in the same reverse pass, target-major. In
default mode there is one stream per target; in contrastive mode two, positive then
negative (the explanation of target ``t`` is ``R[2t] - R[2t + 1]``). With one target,
``S = 1`` (default) or ``S = 2`` (contrastive). Rules that treat each entry alike work on
the whole stack (broadcasting over the leading axis) or map a one-tensor function over it
with :func:`rmap`; only the contrastive weighted-sum rule (``rules/core.py``) mixes a
target's two streams, and no rule mixes targets.

:class:`Streams` is the pair type of the first documented rule form (a contrastive
relevance as ``(pos, neg)``); only the adapter for rules written to that form uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, NamedTuple

import torch
from torch import Tensor

#: A stacked relevance: ``[S, *shape]`` (``S`` = targets × streams; streams: 1 default, 2
#: contrastive: pos, neg).
Rel = Tensor

#: Streams per target of the explanation being run (1 default, 2 contrastive); ``None``
#: outside an explanation. Set by the engine, read where a rule does not say its mode.
CURRENT_STREAMS: ContextVar[int | None] = ContextVar("dlbhooks_streams", default=None)


def by_target(R: Rel, streams: int) -> list[Rel]:
    """``R`` cut into one stacked relevance per target (``[streams, ...]`` views)."""
    return list(R.split(streams, dim=0))


class Streams(NamedTuple):
    """The two streams of contrastive mode as a pair (the first documented rule form)."""

    pos: Tensor
    neg: Tensor


def stack(parts: list[Tensor] | tuple[Tensor, ...]) -> Rel:
    """The stacked relevance of per-stream tensors (no copy for one stream). Each slice
    keeps the memory layout of the first part (a transposed part stays transposed), so
    what is computed from a slice — its total, a product — is what was computed from the
    part itself, to the bit."""
    first = parts[0]
    if len(parts) == 1:
        return first.unsqueeze(0)
    spaced = _evenly_spaced(parts)
    if spaced is not None:  # views of one stacked tensor (rmap of a view): stay a view
        return spaced
    if first.is_contiguous() or first.dim() < 2:
        return torch.stack(tuple(parts))
    # dims from outermost to innermost in memory
    order = sorted(range(first.dim()), key=lambda d: (-first.stride(d), -first.shape[d]))
    buf = first.new_empty((len(parts), *(first.shape[d] for d in order)))
    out = buf.permute(0, *(order.index(d) + 1 for d in range(first.dim())))
    for k, p in enumerate(parts):
        out[k].copy_(p)
    return out


def _evenly_spaced(parts: list[Tensor] | tuple[Tensor, ...]) -> Tensor | None:
    """The parts as one strided view ``[S, *shape]`` when they are equally shaped and
    strided views into one storage at evenly spaced offsets (what slicing or reshaping
    each stream of a stacked relevance gives), else ``None``."""
    first = parts[0]
    if first.requires_grad or not first.is_floating_point():
        return None
    try:
        ptr = first.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    step = parts[1].storage_offset() - first.storage_offset()
    if step <= 0 or step < first.numel():  # (slices of one stream would overlap)
        return None
    for k, q in enumerate(parts):
        if q.shape != first.shape or q.stride() != first.stride() or q.dtype != first.dtype \
                or q.device != first.device \
                or q.storage_offset() != first.storage_offset() + k * step \
                or q.untyped_storage().data_ptr() != ptr:
            return None
    return first.as_strided((len(parts), *first.shape), (step, *first.stride()),
                            first.storage_offset())


def streams_of(R: Rel) -> list[Tensor]:
    """The per-stream tensors of ``R``: ``[R[0]]`` or ``[R⁺, R⁻]`` (views)."""
    return list(R.unbind(0))


def rmap(fn: Callable[..., Tensor | None], *rels: Rel) -> Rel | None:
    """``fn`` (of one tensor per argument) applied to each stream of the relevances
    ``rels``, the results stacked again (``None`` if ``fn`` returns ``None`` for one).
    (:class:`Streams` pairs, the first rule form, are mapped pair to pair.)"""
    if isinstance(rels[0], Streams):
        return Streams(fn(*(r.pos for r in rels)), fn(*(r.neg for r in rels)))
    parts = [fn(*(r[s] for r in rels)) for s in range(rels[0].shape[0])]
    if any(p is None for p in parts):
        return None
    return stack(parts)  # type: ignore[arg-type]


def per_stream(fn: Callable[[Tensor], Any], R: Rel) -> Any:
    """``fn`` (of one tensor) applied to each stream of ``R``, its results stacked again:
    tensors are stacked, lists and tuples element by element (nested: ``(parts,
    lost)``), ``None`` stays ``None``."""
    return _stack_like([fn(r) for r in R.unbind(0)])


def _stack_like(results: list[Any]) -> Any:
    first = results[0]
    if first is None:
        return None
    if isinstance(first, (list, tuple)):
        return type(first)(_stack_like(list(items)) for items in zip(*results))
    return stack(results)


def rsum(rel: Rel | None) -> Tensor | None:
    """Per-stream totals of a relevance, as a float64 vector of length ``S``."""
    if rel is None:
        return None
    if rel.dim() == 0:
        raise ValueError("a relevance (or an absorbed total) needs its leading stream axis: "
                         "shape [S, ...] (S = 1 in default mode, 2 in contrastive mode)")
    if rel.dim() == 1 and rel.dtype == torch.float64:
        return rel
    if rel.shape[0] == 1:  # (one stream: no unbind and stack, the same value)
        return total64(rel[0]).reshape(1)
    return torch.stack([total64(r) for r in rel.unbind(0)])


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
    return torch.add(a, b)


def net(rel: Rel) -> Tensor:
    """The explanation map: ``R[0]`` (default mode) or ``R[0] - R[1]`` (contrastive)."""
    return rel[0] if rel.shape[0] == 1 else rel[0] - rel[1]


def to_float(rel: Tensor | None) -> float | tuple[float, float]:
    """Per-stream totals as a float, or ``(pos, neg)`` in contrastive mode."""
    if rel is None:
        return 0.0
    if rel.dim() == 0:
        return float(rel)
    values = rel.tolist()
    return values[0] if len(values) == 1 else (values[0], values[1])


def all_finite(t: Tensor) -> bool:
    """No NaN or inf in ``t``: one reduction when the sum is finite (NaN and inf always
    reach it), the element-wise test only when it is not (it may just overflow)."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def has_nan(t: Tensor) -> bool:
    """Any NaN in ``t`` (one reduction when the sum is finite)."""
    return not math.isfinite(float(t.sum())) and bool(torch.isnan(t).any())
