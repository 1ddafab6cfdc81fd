"""View geometry: which elements of a recorded tensor a view holds, and moving relevance
between a view and its base exactly (:func:`view_to_base`, :func:`base_to_view`)."""

from __future__ import annotations

import torch
from torch import Tensor


def may_be_view_of(view: Tensor, base: Tensor) -> bool:
    """Cheap test: ``view`` lies inside ``base``'s span of memory (exact test is later)."""
    if view.dtype != base.dtype or view.device != base.device or view.numel() == 0:
        return False

    def span(t: Tensor) -> tuple[int, int]:
        hi = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
        return t.storage_offset(), hi

    v0, v1 = span(view)
    b0, b1 = span(base)
    return b0 <= v0 and v1 <= b1


def _positions(view: Tensor, base: Tensor, device) -> Tensor | None:
    """For each element of ``view`` (flattened), its flat position in ``base``; ``None`` if
    some element of ``view`` is not an element of ``base``."""
    size = 1 + max(
        t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
        for t in (view, base)
    )
    ar = torch.arange(size, device=device)
    base_idx = ar.as_strided(base.shape, base.stride(), base.storage_offset()).reshape(-1)
    view_idx = ar.as_strided(view.shape, view.stride(), view.storage_offset()).reshape(-1)
    where = torch.full((size,), -1, dtype=torch.long, device=device)
    where[base_idx] = torch.arange(base_idx.numel(), device=device)
    pos = where[view_idx]
    return None if bool((pos < 0).any()) else pos


def base_to_view(rel: Tensor, view: Tensor, base: Tensor) -> tuple[Tensor, Tensor] | None:
    """Split relevance on ``base``'s elements into the part at the elements of ``view``
    (shaped like ``view``) and the rest (shaped like ``base``): the inverse of
    :func:`view_to_base` for views whose elements are distinct."""
    pos = _positions(view, base, rel.device)
    if pos is None or pos.unique().numel() != pos.numel():
        return None
    flat = rel.reshape(-1)
    rest = flat.clone()
    rest[pos] = 0
    return flat[pos].view(view.shape), rest.view(base.shape)


def _non_overlapping(t: Tensor) -> bool:
    """Sufficient test that no two elements of ``t`` share memory."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    span = 1
    for st, sz in dims:
        if st < span:
            return False
        span = st * sz
    return True


def dense(t: Tensor) -> bool:
    """``t`` owns every position of its span of memory exactly once (contiguous or
    permuted), so positions and elements correspond one to one."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.numel() > 0 and span == t.numel() and _non_overlapping(t)


def _offset_in(view: Tensor, base: Tensor) -> int | None:
    """Where ``view`` starts in the span of ``base``, if the fast path of
    :func:`view_to_base` applies: a dense base (contiguous or permuted) and a
    non-overlapping view inside it; else ``None``."""
    if not dense(base) or not _non_overlapping(view):
        return None  # the base must be dense (contiguous or permuted), the view distinct
    off = view.storage_offset() - base.storage_offset()
    last = off + sum((s - 1) * st for s, st in zip(view.shape, view.stride()))
    return None if off < 0 or last >= base.numel() else off


def _strided_copy(R: Tensor, view: Tensor, base: Tensor, off: int) -> Tensor:
    """The fast path of :func:`view_to_base` for every entry of the stacked ``R``
    (``[S, *view.shape]``, ``view`` at ``off`` in ``base``): one strided copy into
    ``[S, *base.shape]``, each entry laid out like the (dense) base."""
    S, N = R.shape[0], base.numel()
    whole = view.numel() == N
    if whole and R.device == base.device and R.stride()[1:] == view.stride() \
            and (S == 1 or R.stride(0) == N) and R.storage_offset() >= off:
        # ``R`` already lies in memory as the base would (a rule wrote it in the view's
        # layout, or the view is a reshape of a contiguous base): the same memory, viewed
        # as the base, is the result; no copy
        return R.as_strided((S, *base.shape), (N, *base.stride()), R.storage_offset() - off)
    # a view of every element of the base (a permutation of heads, a reshape) writes all
    # of them, so nothing needs clearing first
    fill = torch.empty if whole else torch.zeros
    block = fill(S * N, dtype=R.dtype, device=base.device)
    block.as_strided((S, *view.shape), (N, *view.stride()), off).copy_(R)
    return block.as_strided((S, *base.shape), (N, *base.stride()), 0)


def _strided_to_base(rel: Tensor, view: Tensor, base: Tensor) -> Tensor | None:
    """Fast path of :func:`view_to_base`: one strided copy instead of index tables."""
    off = _offset_in(view, base)
    return None if off is None else _strided_copy(rel.unsqueeze(0), view, base, off)[0]


def stacked_to_base(R: Tensor, view: Tensor, base: Tensor) -> Tensor | None:
    """:func:`view_to_base` of every entry of the stacked ``R`` (``[S, *view.shape]``):
    ``[S, *base.shape]``, each entry laid out like ``base``; one strided copy for all
    entries on the fast path, else entry by entry (``None`` as there)."""
    off = _offset_in(view, base)
    if off is None:
        parts = [view_to_base(r, view, base) for r in R.unbind(0)]
        return None if any(p is None for p in parts) else torch.stack(parts)  # type: ignore
    return _strided_copy(R, view, base, off)


def view_to_base(rel: Tensor, view: Tensor, base: Tensor) -> Tensor | None:
    """Move relevance from a view back onto the elements of its base (exact inverse).

    Returns ``None`` if some element of ``view`` is not an element of ``base``.
    """
    fast = _strided_to_base(rel, view, base)
    if fast is not None:
        return fast
    pos = _positions(view, base, rel.device)
    if pos is None:
        return None
    out = rel.new_zeros(base.numel())
    out.index_add_(0, pos, rel.reshape(-1))
    return out.view(base.shape)
