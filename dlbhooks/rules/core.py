"""The weighted-sum rule of METHOD.md §2, in all its forms. Nothing else re-derives it.

A unit computes ``t_j = sum_i w_ji a_i + b_j``. Its relevance is split over the
contributions ``w_ji a_i``: :func:`coefficients` returns, per stream, two per-unit tensors
``(c_abs, c_sgn)`` such that contribution ``i -> j`` receives
``c_abs_j * |w_ji a_i| + c_sgn_j * w_ji a_i``. A rule turns that into relevance per input
with two products against ``|W|`` and ``W`` (``c_sgn`` is ``None`` when it is not needed),
which never builds a [rows, out, in] tensor. :func:`weighted_sum` does this for any linear
map given its forward and adjoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..relevance import Rel, Streams

Bounds = tuple[float | Tensor | None, float | Tensor | None]


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` where ``den != 0``, else 0 (one division, one clean-up pass)."""
    return torch.nan_to_num_(num / den, nan=0.0, posinf=0.0, neginf=0.0)


def _divide(R: Tensor, T: Tensor) -> Tensor:
    """``R / T`` with 0 where ``T == 0`` (T is never negative here)."""
    s = R / T
    return torch.nan_to_num_(s, nan=0.0, posinf=0.0, neginf=0.0)


def _absorbed(R: Tensor, s: Tensor, T: Tensor, babs: Tensor | None) -> Tensor:
    """What a unit keeps from its contributions: the bias share Σ s·|b| plus the relevance
    of units with T = 0 (the guard). Cheap: one reduction for the bias, none for the guard
    when every |b| > 0 (then T > 0)."""
    absorbed = R.new_zeros((), dtype=torch.float64)
    if babs is not None:
        from .elementwise import reduce_to

        absorbed = absorbed + (reduce_to(s, babs.shape) * babs).sum().double()
        if bool((babs > 0).all()):
            return absorbed
    zero = T == 0
    if bool(zero.any()):
        absorbed = absorbed + torch.where(zero, R, 0.0).sum().double()
    return absorbed


def split_signs(abs_total: Tensor, signed_total: Tensor) -> tuple[Tensor, Tensor]:
    """P (sum of positive contributions) and N (sum of |negative| ones) from their sum and
    difference; a side that is only rounding noise (<= 64 eps of the total) is exactly 0."""
    P = ((abs_total + signed_total) * 0.5).clamp_min(0)
    N = ((abs_total - signed_total) * 0.5).clamp_min(0)
    tol = abs_total * (64 * torch.finfo(abs_total.dtype).eps)
    return torch.where(P <= tol, 0.0, P), torch.where(N <= tol, 0.0, N)


def coefficients(
    R: Rel,
    abs_total: Tensor,
    signed_total: Tensor | None,
    bias: Tensor | None,
    *,
    bounds: Bounds | None = None,
) -> tuple[list[tuple[Tensor, Tensor | None]], Rel]:
    """Per-unit split coefficients and the relevance absorbed (bias shares, guards).

    ``abs_total = sum_i |w_ji a_i|`` (= P_j + N_j), ``signed_total = sum_i w_ji a_i``
    (= P_j - N_j; needed for saturation and contrastive mode), ``bias`` broadcastable to
    the units or ``None``. ``bounds`` = (lower, upper) of the following activation on
    ``t_j``, applied in default mode only (saturation). Returns one ``(c_abs, c_sgn)``
    per stream and the absorbed total (a scalar, or :class:`Streams` of scalars).
    """
    if isinstance(R, Streams):
        return _contrastive(R, abs_total, signed_total, bias)
    babs = bias.abs() if bias is not None else None
    sat = bounds is not None and (bounds[0] is not None or bounds[1] is not None)
    if not sat:
        T = abs_total + babs if babs is not None else abs_total
        return [(s := _divide(R, T), None)], _absorbed(R, s, T, babs)
    if signed_total is None:
        raise ValueError("saturation needs the signed total of the contributions")
    t = signed_total + bias if bias is not None else signed_total
    P, N = split_signs(abs_total, signed_total)
    lo, hi = bounds
    keep_p = ~(t < lo) if lo is not None else torch.ones_like(t, dtype=torch.bool)
    keep_n = ~(t > hi) if hi is not None else torch.ones_like(t, dtype=torch.bool)
    moving = torch.where(keep_p, P, 0.0) + torch.where(keep_n, N, 0.0)
    T = moving + babs if babs is not None else moving
    s = _divide(R, T)
    cp = torch.where(keep_p, s, 0.0)
    cn = torch.where(keep_n, s, 0.0)
    absorbed = _absorbed(R, s, T, babs)
    if bool((keep_p & keep_n).all()):
        return [(s, None)], absorbed
    return [((cp + cn) * 0.5, (cp - cn) * 0.5)], absorbed


def _contrastive(R: Streams, abs_total: Tensor, signed_total: Tensor | None, bias: Tensor | None):
    if signed_total is None:
        raise ValueError("contrastive mode needs the signed total of the contributions")
    t = signed_total + bias if bias is not None else signed_total
    P, N = split_signs(abs_total, signed_total)
    rp, rn = R.pos, R.neg
    aligned = ((t > 0) & (rp > rn)) | ((t <= 0) & (rp <= rn))
    degenerate = (P == 0) | (N == 0)
    all_p, all_n, all_t = safe_div(rp, P), safe_div(rn, N), None
    cp_pos = torch.where(aligned, all_p, 0.0)
    cn_pos = torch.where(aligned, 0.0, safe_div(rp, N))
    cp_neg = torch.where(aligned, 0.0, safe_div(rn, P))
    cn_neg = torch.where(aligned, all_n, 0.0)
    all_t = safe_div(rp, abs_total), safe_div(rn, abs_total)
    cp_pos = torch.where(degenerate, all_t[0], cp_pos)
    cn_pos = torch.where(degenerate, all_t[0], cn_pos)
    cp_neg = torch.where(degenerate, all_t[1], cp_neg)
    cn_neg = torch.where(degenerate, all_t[1], cn_neg)
    lost = abs_total == 0
    absorbed = Streams(torch.where(lost, rp, 0.0).sum(), torch.where(lost, rn, 0.0).sum())
    return [
        ((cp_pos + cn_pos) * 0.5, (cp_pos - cn_pos) * 0.5),
        ((cp_neg + cn_neg) * 0.5, (cp_neg - cn_neg) * 0.5),
    ], absorbed


def weighted_sum(
    R: Rel,
    a: Tensor,
    W: Tensor,
    bias: Tensor | None,
    forward: Callable[[Tensor, Tensor], Tensor],
    adjoint: Callable[[Tensor, Tensor], Tensor] | None = None,
    *,
    bounds: Bounds | None = None,
    output: Tensor | None = None,
) -> tuple[Rel, Rel]:
    """Relevance on the input ``a`` of the linear map ``forward(a, W) + bias``.

    ``forward(x, W)`` is the map without bias; ``adjoint(s, W)`` its transpose applied to
    a unit-shaped tensor (computed with ``torch.func.vjp`` when not given). ``output``,
    if given, is the recorded ``forward(a, W) + bias`` and saves one product.
    """
    contrastive = isinstance(R, Streams)
    need_signed = contrastive or (bounds is not None and bounds != (None, None))
    absW, absa = W.abs(), a.abs()
    if adjoint is None:
        abs_total, vjp_abs = torch.func.vjp(lambda x: forward(x, absW), absa)
        adj_abs = lambda s: vjp_abs(s)[0]  # noqa: E731
    else:
        abs_total = forward(absa, absW)
        adj_abs = lambda s: adjoint(s, absW)  # noqa: E731
    signed, adj_sgn = None, None
    if need_signed:
        if output is not None:
            signed = output - bias if bias is not None else output
        if adjoint is None:
            fwd_signed, vjp_sgn = torch.func.vjp(lambda x: forward(x, W), a)
            signed = fwd_signed if signed is None else signed
            adj_sgn = lambda s: vjp_sgn(s)[0]  # noqa: E731
        else:
            signed = forward(a, W) if signed is None else signed
            adj_sgn = lambda s: adjoint(s, W)  # noqa: E731
    coefs, absorbed = coefficients(R, abs_total, signed, bias, bounds=bounds)
    outs = []
    for c_abs, c_sgn in coefs:
        r = absa * adj_abs(c_abs)
        if c_sgn is not None:
            if adj_sgn is None:  # default mode, saturation fired without a signed adjoint
                _, vjp_sgn = torch.func.vjp(lambda x: forward(x, W), a)
                adj_sgn = lambda s: vjp_sgn(s)[0]  # noqa: E731
            r = r + a * adj_sgn(c_sgn)
        outs.append(r)
    return (Streams(*outs) if contrastive else outs[0]), absorbed
