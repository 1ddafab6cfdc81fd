"""The weighted-sum rule of METHOD.md §2, in all its forms. Nothing else re-derives it.

A unit computes ``t_j = sum_i w_ji a_i + b_j``. Its relevance is split over the
contributions ``w_ji a_i``: :func:`coefficients` returns, per stream, two per-unit tensors
``(c_abs, c_sgn)`` such that contribution ``i -> j`` receives
``c_abs_j * |w_ji a_i| + c_sgn_j * w_ji a_i``. A rule turns that into relevance per input
with two products against ``|W|`` and ``W`` (``c_sgn`` is ``None`` when it is not needed),
which never builds a [rows, out, in] tensor. :func:`weighted_sum` does this for any linear
map given its forward and adjoint.

Cost notes: saturation only changes the split of units that carry relevance *and* whose
pre-activation is beyond a bound, so the saturated formulation (and the signed products it
needs) runs only when such a unit exists; temporaries the rule made itself are reused in
place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import scratch
from ..relevance import CURRENT_STREAMS, Rel, by_target, stack

# the arithmetic helpers lived here before rules/arith.py; importable from here still
from .arith import (  # noqa: F401
    broadcasts_into,
    fits,
    nonneg_div,
    nonzero_along,
    reduce_to,
    safe_div,
)

Bounds = tuple[float | Tensor | None, float | Tensor | None]


def _zero_units(T: Tensor, babs: Tensor | None, positive: bool | None = None) -> Tensor | None:
    """Mask of the units with ``T == 0`` (the guard), or ``None`` when there are none:
    none when every |b| > 0 (``positive``, if the caller knows); else one reduction
    decides, the mask is made only if needed."""
    if positive is None and babs is not None and babs.numel():
        positive = float(babs.amin()) > 0
    if positive and babs is not None:
        return None
    if T.numel() == 0 or float(T.amin()) > 0:
        return None
    return T == 0


def _absorbed(R: Tensor, s: Tensor, babs: Tensor | None, zero: Tensor | None,
              stacked: bool = False) -> Tensor:
    """What a unit keeps from its contributions: the bias share Σ s·|b| plus the relevance
    of units with T = 0 (``zero``, the guard). ``stacked``: ``R`` and ``s`` have a leading
    stack axis and the totals are per entry (``[S]``), else one total."""
    if stacked:
        S = R.shape[0]
        if babs is not None and not (babs.dim() == 1 and s.dim() >= 2
                                     and s.shape[-1] == babs.shape[0]):
            return torch.stack([_absorbed(R[k], s[k], babs, zero) for k in range(S)])
    absorbed = None
    if babs is not None:
        if babs.dim() == 1 and s.dim() >= 1 and s.shape[-1] == babs.shape[0]:
            absorbed = _total(torch.matmul(s, babs.to(s.dtype)), stacked)
        else:
            absorbed = (reduce_to(s, babs.shape) * babs).sum()
    if zero is not None:
        lost = _total(torch.where(zero, R, 0.0), stacked)
        absorbed = lost if absorbed is None else absorbed + lost
    if absorbed is None:
        return R.new_zeros((R.shape[0],) if stacked else (), dtype=torch.float64)
    return absorbed.double()


def _total(t: Tensor, stacked: bool) -> Tensor:
    """The sum of ``t``, per entry of its leading axis if ``stacked``."""
    return t.reshape(t.shape[0], -1).sum(1) if stacked else t.sum()


def coefficients(
    R: Tensor,
    abs_total: Tensor,
    signed_total: Tensor | None,
    bias: Tensor | None,
    *,
    bounds: Bounds | None = None,
) -> tuple[list[tuple[Tensor, Tensor | None]], Tensor]:
    """Default mode's per-unit split coefficients and the relevance absorbed (bias shares,
    guards).

    ``abs_total = sum_i |w_ji a_i|`` (= P_j + N_j), ``signed_total = sum_i w_ji a_i``
    (= P_j - N_j; needed for saturation), ``bias`` broadcastable to the units or ``None``.
    ``bounds`` = (lower, upper) of the following activation on ``t_j`` (saturation).
    ``R`` is one stream's relevance (no leading axis). Returns ``[(c_abs, c_sgn)]`` and
    the absorbed total. Contrastive mode needs each unit's sides summed directly:
    :func:`contrastive_split` and :func:`contrastive_side_coefficients` (or
    :func:`weighted_sum`).
    """
    if _has_bounds(bounds) and signed_total is None:
        raise ValueError("saturation needs the signed total of the contributions")
    return _default(R, abs_total, signed_total, bias, bounds)


def _has_bounds(bounds: Bounds | None) -> bool:
    return bounds is not None and (bounds[0] is not None or bounds[1] is not None)


def _default(
    R: Tensor,
    abs_total: Tensor,
    signed: Tensor | Callable[[], Tensor] | None,
    bias: Tensor | None,
    bounds: Bounds | None,
    *,
    pre: Tensor | None = None,
    own: bool = False,
    babs: Tensor | None = None,
    positive: bool | None = None,
    stacked: bool = False,
) -> tuple[list[tuple[Tensor, Tensor | None]], Tensor]:
    """Default mode. ``signed`` may be a function computing the signed total (called only
    if saturation fires); ``pre``: the pre-activation ``t`` if known (the recorded output);
    ``own``: ``abs_total`` is the caller's temporary and may be overwritten; ``babs``:
    ``|bias|`` if the caller has it, ``positive``: whether all of it is > 0, if known;
    ``stacked``: ``R`` has a leading axis of several relevances split alike (targets), the
    coefficients keep it and the absorbed totals are per entry."""
    if babs is None and bias is not None:
        babs = bias.abs()
    if _has_bounds(bounds):
        if pre is None:
            sg = signed() if callable(signed) else signed
            signed = sg
            pre = sg + bias if bias is not None else sg
        lo, hi = bounds
        if _beyond(pre, lo, hi):
            d = _half_side(pre, lo, hi)
            hit = d * R if R.dim() else (d if bool(R != 0) else None)
            if hit is not None and hit.numel():
                mn, mx = torch.aminmax(hit)
                if bool(mn < 0) or bool(mx > 0):  # a saturated unit carries relevance
                    sg = signed() if callable(signed) else signed
                    return _saturated(R, abs_total, sg, babs, d, own, positive, stacked)
    if babs is not None:
        T = abs_total.add_(babs) if own and fits(abs_total, babs) else abs_total + babs
        own = True
    else:
        T = abs_total
    zero = _zero_units(T, babs, positive)
    # several targets' coefficients only live until the adjoint product: a scratch buffer
    # (they are larger than anything else the rule makes, and one per layer)
    out = scratch.buffer("weighted_sum.coefficients", tuple(R.shape), torch.result_type(R, T),
                         R.device) if stacked and R.shape[0] > 1 and not (own and fits(T, R)) \
        and broadcasts_into(T.shape, R.shape) else None
    s = nonneg_div(R, T, own=own, positive=zero is None, out=out)
    return [(s, None)], _absorbed(R, s, babs, zero, stacked)


def _beyond(pre: Tensor, lo, hi) -> bool:
    """Is any pre-activation beyond a bound? (One min/max pass; tensor bounds: True.)"""
    if pre.numel() == 0:
        return False
    if isinstance(lo, Tensor) or isinstance(hi, Tensor):
        return True
    mn, mx = torch.aminmax(pre)
    return (lo is not None and bool(mn < lo)) or (hi is not None and bool(mx > hi))


def _half_side(pre: Tensor, lo, hi) -> Tensor:
    """``d = (kp - kn) / 2`` per unit: -½ below ``lo`` (the positive side is dropped), +½
    above ``hi`` (the negative side is dropped), 0 in between (``kp``/``kn`` are 1 where
    the positive/negative contributions keep their share)."""
    if isinstance(lo, Tensor) or isinstance(hi, Tensor):
        lo = pre.new_tensor(lo) if lo is not None and not isinstance(lo, Tensor) else lo
        hi = pre.new_tensor(hi) if hi is not None and not isinstance(hi, Tensor) else hi
    d = torch.clamp(pre, lo, hi)
    return torch.sub(pre, d, out=d).sign_().mul_(0.5)


def _saturated(R, abs_total, signed, babs, d, own, positive=None, stacked=False):
    """Default mode with at least one saturated unit that carries relevance, in float
    arithmetic. With ``h = (kp + kn) / 2 = 1 - |d|``: the moving total is ``kp P + kn N =
    h (P + N) + d (P - N)`` (a dropped side that is rounding noise is 0), ``c_abs = s h``
    and ``c_sgn = s d``."""
    h = d.abs().neg_().add_(1.0)
    tol = abs_total * (64 * torch.finfo(abs_total.dtype).eps)
    moving = abs_total.mul_(h) if own and fits(abs_total, h) else abs_total * h
    moving.addcmul_(d, signed)
    moving.mul_(torch.sub(moving, tol, out=tol).sign_().clamp_min_(0.0))
    if babs is not None:
        T = moving.add_(babs) if fits(moving, babs) else moving + babs
    else:
        T = moving
    zero = _zero_units(T, babs, positive)
    s = nonneg_div(R, T, own=True, positive=zero is None)
    absorbed = _absorbed(R, s, babs, zero, stacked)
    return [(h.mul_(s) if fits(h, s) else h * s, d.mul_(s) if fits(d, s) else d * s)], absorbed


@dataclass
class ContrastiveSplit:
    """What contrastive mode needs of a weighted sum's units that does not depend on the
    relevance (so a recurrent rule computes it for every step at once): ``up`` (t > 0),
    ``inv_p``/``inv_n`` (``ND/P``, ``ND/N``), and for degenerate or empty units ``inv_s``
    (``D/S``) and ``lost`` (a float mask), ``None`` when there are none."""

    up: Tensor
    inv_p: Tensor
    inv_n: Tensor
    inv_s: Tensor | None = None
    lost: Tensor | None = None

    def unbind(self) -> list[ContrastiveSplit]:
        """One split per index of the first dim (a recurrent rule's time steps)."""
        parts = [f.unbind(0) if f is not None else None for f in
                 (self.up, self.inv_p, self.inv_n, self.inv_s, self.lost)]
        return [ContrastiveSplit(*(None if f is None else f[k] for f in parts))
                for k in range(self.up.shape[0])]


def contrastive_split(P: Tensor, N: Tensor, signed_total: Tensor,
                      bias: Tensor | None) -> ContrastiveSplit:
    """The forward-only part of contrastive mode's per-unit split (see
    :func:`contrastive_side_coefficients`) from each unit's sides — ``P`` the sum of its
    positive contributions, ``N`` of its |negative| ones, both summed directly (from
    ``Σ|w a| ± Σ w a`` a small side would carry ``eps·(P + N)``, amplified in its stream
    by ``(P + N) / side``) — its signed total and the bias (their sum's sign decides
    alignment). ``P`` and ``N`` are not modified."""
    t = signed_total + bias if bias is not None else signed_total
    dt = P.dtype
    small = torch.finfo(dt).tiny * 2.0**24  # a side below is empty (far from overflow in R/P)
    side = torch.minimum(P, N)  # > small where both sides exist
    if side.numel() and float(side.amin()) > small:
        # no degenerate (or empty) unit: nothing is lost, every unit splits both ways
        return ContrastiveSplit(t > 0, P.reciprocal(), N.reciprocal())
    tiny = torch.finfo(dt).tiny
    ND = (side > small).to(dt)  # 0 where a side is empty (degenerate or lost)
    S = P + N
    live = S > 0
    inv_s = live.to(dt).div_(S.clamp_min(tiny)).mul_(1.0 - ND)
    return ContrastiveSplit(t > 0, ND / P.clamp_min(tiny), ND / N.clamp_min(tiny), inv_s,
                            (~live).to(dt))  # (P, N > small wherever ND = 1)


def contrastive_side_coefficients(
    R: Tensor, split: ContrastiveSplit
) -> tuple[list[tuple[Tensor, Tensor]], Tensor]:
    """Contrastive mode of §2 per unit, as what each stream gives its unit's positive and
    its negative contributions: ``[(cp, cn) for the + stream, (cp, cn) for the - stream]``
    (contribution ``i -> j`` receives ``cp_j |w_ji a_i|`` if positive, ``cn_j |w_ji a_i|``
    if negative), and the relevance lost by units without contributions. Aligned units
    (t > 0 and R+ > R-, or neither) give R+ to the positive side (``R+/P``) and R- to the
    negative side (``R-/N``), crossed ones the other way round, degenerate ones (a side
    empty) both streams ∝ |contribution| (``R/S`` on either side)."""
    rp, rn = R[0], R[1]  # (stacked [2, ...])
    A = torch.eq(split.up, rp > rn).to(split.inv_p.dtype)  # aligned
    x_pos, y_neg = A * split.inv_p, A * split.inv_n  # A/P, A/N
    x_neg, y_pos = torch.sub(split.inv_p, x_pos), torch.sub(split.inv_n, y_neg)  # (1-A)/P, (1-A)/N
    if split.lost is None:
        absorbed = torch.stack((rp.new_zeros(()), rn.new_zeros(())))
    else:
        absorbed = torch.stack(((rp * split.lost).sum(), (rn * split.lost).sum()))
    coefs = []
    for r, x, y in ((rp, x_pos, y_pos), (rn, x_neg, y_neg)):
        if split.inv_s is not None:
            x = x + split.inv_s
            y = y + split.inv_s
        coefs.append((x.mul_(r) if x.shape == r.shape else x * r,
                      y.mul_(r) if y.shape == r.shape else y * r))
    return coefs, absorbed


def _vjp(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Callable[..., Any]]:
    """``fn(x)`` and its pull-back (``torch.func.vjp`` without auxiliary outputs)."""
    out, pull = torch.func.vjp(fn, x)[:2]
    return out, pull


def _bound(forward: Callable[[Tensor, Tensor], Tensor], w: Tensor) -> Callable[[Tensor], Tensor]:
    """``x -> forward(x, w)``."""
    return lambda x: forward(x, w)


def _abs_input(a: Tensor) -> Tensor:
    """``|a|``; ``a`` itself when it has no negative entries (e.g. after a ReLU), which a
    read-only reduction decides (skipped when the first entries already show a sign).
    Consecutive layers reading the same input (a transformer's query, key and value
    projections) share it within an explanation (:func:`~dlbhooks.scratch.memo`); it is
    never written to."""
    return scratch.memo("abs_input", a, lambda: _abs_of(a))


def _abs_of(a: Tensor) -> Tensor:
    if a.is_floating_point() and a.numel():
        if a.numel() > 65536 and a.is_contiguous() and float(a.reshape(-1)[:256].amin()) < 0:
            return a.abs()  # signed: seen in the first entries, no full pass needed
        if float(a.amin()) >= 0:
            return a
    return a.abs()


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
    abs_weight: Tensor | None = None,
    abs_bias: Tensor | None = None,
    bias_positive: bool | None = None,
    nonneg_input: bool = False,
    shared: dict | None = None,
    contrastive: bool | None = None,
    forward_into: Callable[[Tensor, Tensor, str], Tensor] | None = None,
) -> tuple[Rel, Tensor]:
    """Relevance on the input ``a`` of the linear map ``forward(a, W) + bias``, and what
    the units absorbed, per stream (``[S]``).

    ``R`` is stacked (``[S, *units]``, targets × streams); ``contrastive``: the streams
    come in pairs of contrastive mode (default: the mode of the explanation being run;
    outside one, ``S == 2``), else every stack entry is split by default mode. Several
    targets share every product that does not depend on the relevance (the
    denominators) and go back through the adjoint in one product.

    ``forward(x, W)`` is the map without bias; ``adjoint(s, W)`` its transpose applied to
    a unit-shaped tensor (computed with ``torch.func.vjp`` when not given; an explicit
    adjoint must return a new tensor and accept several unit-shaped tensors stacked on the
    first dim of the units, as a batch). ``output``, if given, is the recorded
    ``forward(a, W) + bias`` and saves one product. ``abs_weight``: ``|W|`` if the caller
    already has it, ``abs_bias`` likewise ``|bias|`` (shaped like ``bias``) and
    ``bias_positive`` whether all of it is > 0; ``nonneg_input``: ``a`` is known to have
    no negative entry (the output of a ReLU), so ``|a| = a``. ``shared``: a dict kept across
    explanations of the same recorded call (several targets on one tape): ``|a|`` and the
    denominators ``forward(|a|, |W|)`` depend on the forward only, so they are computed
    once (needs ``adjoint``). ``forward_into(x, W, key)``: ``forward`` written to the
    scratch buffer ``key`` (:func:`~dlbhooks.scratch.buffer`), for the denominators, a
    temporary of this call (not used when they are ``shared``).
    """
    if contrastive is None:
        streams = CURRENT_STREAMS.get()
        contrastive = streams == 2 if streams is not None else R.shape[0] == 2
    if contrastive:
        return _contrastive_weighted_sum(R, a, W, bias, forward, adjoint, output=output,
                                         nonneg_input=nonneg_input, shared=shared)
    if R.shape[0] != 1:
        return _default_weighted_sum(
            R, a, W, bias, forward, adjoint, bounds=bounds, output=output,
            abs_weight=abs_weight, abs_bias=abs_bias, bias_positive=bias_positive,
            nonneg_input=nonneg_input, shared=shared, stacked=True, into=forward_into)
    r, absorbed = _default_weighted_sum(
        R[0], a, W, bias, forward, adjoint, bounds=bounds, output=output,
        abs_weight=abs_weight, abs_bias=abs_bias, bias_positive=bias_positive,
        nonneg_input=nonneg_input, shared=shared, into=forward_into)
    return r.unsqueeze(0), absorbed.reshape(1)


def _default_weighted_sum(
    R: Tensor, a: Tensor, W: Tensor, bias: Tensor | None,
    forward: Callable[[Tensor, Tensor], Tensor],
    adjoint: Callable[[Tensor, Tensor], Tensor] | None, *,
    bounds: Bounds | None, output: Tensor | None, abs_weight: Tensor | None,
    abs_bias: Tensor | None, bias_positive: bool | None, nonneg_input: bool,
    shared: dict | None, stacked: bool = False,
    into: Callable[[Tensor, Tensor, str], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`weighted_sum` in default mode, for one stream's relevance (no leading axis),
    or for several split alike (``stacked``: a leading axis, kept in the result and the
    absorbed totals)."""
    saturate = _has_bounds(bounds)
    absW = W.abs() if abs_weight is None else abs_weight
    ab = _AbsSide.of(a, absW, forward, adjoint, nonneg_input, shared, into)
    sgn = _Signed(a, W, bias, forward, adjoint, output)
    [(c_abs, c_sgn)], absorbed = _default(
        R, ab.total, sgn.total, bias, bounds if saturate else None,
        pre=output if saturate else None, own=ab.own_total, babs=abs_bias,
        positive=bias_positive, stacked=stacked)
    fold = stacked and adjoint is not None and c_abs.dim() >= 3
    r = _each(ab.adjoint, c_abs, fold) if stacked else ab.adjoint(c_abs)
    r = r.mul_(ab.a) if (ab.own or stacked) and fits(r, ab.a) else ab.a * r
    if c_sgn is not None:
        q = _each(sgn.adjoint, c_sgn, fold) if stacked else sgn.adjoint(c_sgn)
        r = r.add_(q.mul_(a) if (ab.own or stacked) and fits(q, a) else a * q)
    return r, absorbed


def _each(adjoint: Callable[[Tensor], Tensor], c: Tensor, fold: bool) -> Tensor:
    """``adjoint`` applied to every entry of the stacked ``c`` (``[S, *units]``): in one
    call with the entries stacked on the units' first dim (``fold``: an explicit adjoint
    takes them as a batch), else one call each. A new tensor ``[S, *input]``."""
    S = c.shape[0]
    if fold:
        out = adjoint(c.reshape(S * c.shape[1], *c.shape[2:]))
        return out.reshape(S, out.shape[0] // S, *out.shape[1:])
    return torch.stack([adjoint(x) for x in c.unbind(0)])


class _AbsSide(NamedTuple):
    """The magnitudes a default-mode weighted sum splits by: ``|a|``, the denominators
    ``total = forward(|a|, |W|)`` and the adjoint against ``|W|``; ``own``: the rule may
    work in place on what the adjoint returns, ``own_total``: on ``total``."""

    a: Tensor
    total: Tensor
    adjoint: Callable[[Tensor], Tensor]
    own: bool
    own_total: bool

    @classmethod
    def of(cls, a: Tensor, absW: Tensor, forward, adjoint, nonneg_input: bool,
           shared: dict | None,
           into: Callable[[Tensor, Tensor, str], Tensor] | None = None) -> _AbsSide:
        if adjoint is None:
            absa = a if nonneg_input else _abs_input(a)
            total, vjp_abs = _vjp(lambda x: forward(x, absW), absa)
            # (a vjp may hand back views: nothing in place)
            return cls(absa, total, lambda s: vjp_abs(s)[0], False, False)
        if shared is not None and "abs_total" in shared:
            absa, total = shared["abs_a"], shared["abs_total"]
        else:
            absa = a if nonneg_input else _abs_input(a)
            # the denominators are used up within the call: a reused block, unless shared
            total = into(absa, absW, "weighted_sum.denominators") \
                if into is not None and shared is None else forward(absa, absW)
            if shared is not None:
                shared.update(abs_a=absa, abs_total=total)
        # a shared total is read, never overwritten
        return cls(absa, total, lambda s: adjoint(s, absW), True, shared is None)


class _Signed:
    """``W a`` (without bias) and the adjoint against ``W``, computed on first use (only
    saturation needs them); ``output``, the recorded ``W a + bias``, saves the product."""

    def __init__(self, a: Tensor, W: Tensor, bias: Tensor | None, forward, adjoint,
                 output: Tensor | None):
        self._args = (a, W, bias, forward, adjoint, output)
        self._total: Tensor | None = None
        self._adjoint: Callable[[Tensor], Tensor] | None = None

    def total(self) -> Tensor:
        if self._total is None:
            a, W, bias, forward, adjoint, output = self._args
            if adjoint is None:
                out, vjp_sgn = _vjp(lambda x: forward(x, W), a)
                self._adjoint = lambda s: vjp_sgn(s)[0]
            else:
                out = None
                self._adjoint = lambda s: adjoint(s, W)
            if output is not None:
                out = output - bias if bias is not None else output
            elif out is None:
                out = forward(a, W)
            self._total = out
        return self._total

    def adjoint(self, s: Tensor) -> Tensor:
        self.total()
        return self._adjoint(s)


def _sign_parts(a: Tensor, W: Tensor, nonneg: bool) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``(a part, weights making positive contributions with it, weights making negative
    ones)``: ``(a⁺, W⁺, W⁻)`` and, when ``a`` has negative entries, ``(a⁻, W⁻, W⁺)`` — all
    magnitudes, so every contribution ``w a`` is one product of non-negative factors."""
    Wp, Wn = W.clamp_min(0.0), W.clamp_max(0.0).neg_()
    if nonneg or (a.numel() and float(a.amin()) >= 0):
        return [(a, Wp, Wn)]
    return [(a.clamp_min(0.0), Wp, Wn), (a.clamp_max(0.0).neg_(), Wn, Wp)]


def _contrastive_weighted_sum(
    R: Tensor, a: Tensor, W: Tensor, bias: Tensor | None,
    forward: Callable[[Tensor, Tensor], Tensor],
    adjoint: Callable[[Tensor, Tensor], Tensor] | None, *,
    output: Tensor | None, nonneg_input: bool, shared: dict | None,
) -> tuple[Tensor, Tensor]:
    """Contrastive mode of §2 for the linear map ``forward(a, W) + bias``.

    Each unit's positive and negative sums ``P``, ``N`` are computed directly (products of
    ``a⁺``, ``a⁻`` with ``W⁺``, ``W⁻``), and relevance goes back through the same
    products: sums of non-negative terms only. From ``Σ|w a|`` and ``Σ w a`` (as default
    mode computes), a side much smaller than the other carries a rounding error of
    ``eps·(P + N)``, amplified by ``(P + N) / side`` in its stream — a leak of up to 1/64
    of that unit's relevance. Costs two products per sign part of ``a`` forward and two
    per part and stream back (the streams stacked into one product where ``adjoint`` is
    given)."""
    if shared is not None and "sides" in shared:
        parts, pulls, P, N = shared["sides"]
    else:
        parts, pulls, P, N = _sides(a, W, forward, adjoint, nonneg_input)
        if shared is not None:
            shared["sides"] = (parts, pulls, P, N)
    if output is not None:
        signed = output - bias if bias is not None else output
    else:
        signed = P - N
    split = contrastive_split(P, N, signed, bias)
    pairs, lost = [], []  # each target's pair of streams, then one way back for all
    for Rt in by_target(R, 2):
        p, ab = contrastive_side_coefficients(Rt, split)
        pairs += p
        lost.append(ab)
    return _contrastive_back(pairs, parts, pulls, adjoint), torch.cat(lost)


def _sides(a: Tensor, W: Tensor, forward, adjoint, nonneg_input: bool):
    """Each unit's positive and negative sums ``P``, ``N`` of the map ``forward(a, W)``,
    from the sign parts of ``a`` and ``W`` (:func:`_sign_parts`); without ``adjoint``, the
    vjp pull-backs of every product too. Returns ``(parts, pulls, P, N)``."""
    parts = _sign_parts(a, W, nonneg_input)
    pulls, P, N = [], None, None
    for ax, wp, wn in parts:
        if adjoint is None:  # a vjp per weight half gives the products and their adjoint
            p, pull_p = _vjp(_bound(forward, wp), ax)
            n, pull_n = _vjp(_bound(forward, wn), ax)
            pulls.append((pull_p, pull_n))
        else:
            p, n = forward(ax, wp), forward(ax, wn)
        P = p if P is None else P + p
        N = n if N is None else N + n
    return parts, pulls, P, N


def _contrastive_back(pairs, parts, pulls, adjoint) -> Tensor:
    """The relevance of ``a`` per stack entry from the coefficients ``[(cp, cn)]`` of each
    entry (:func:`contrastive_side_coefficients`: a target's + and - streams), back
    through the products of :func:`_sides`."""
    n = len(pairs)
    batched = adjoint is not None and pairs[0][0].dim() >= 2
    if batched:  # every entry in one product per weight half: a leading dim of n·N
        def each(cs: list[Tensor]) -> Tensor:
            c = torch.stack(cs)
            return c.view(n * c.shape[1], *c.shape[2:])

        cp, cn = each([p for p, _ in pairs]), each([q for _, q in pairs])
        r = None
        for ax, wp, wn in parts:
            g = adjoint(cp, wp).add_(adjoint(cn, wn)).reshape(n, *ax.shape).mul_(ax)
            r = g if r is None else r.add_(g)
        return r
    outs = []
    for cp_s, cn_s in pairs:
        r = None
        for k, (ax, wp, wn) in enumerate(parts):
            if adjoint is None:
                pull_p, pull_n = pulls[k]
                g = pull_p(cp_s)[0] + pull_n(cn_s)[0]
            else:
                g = adjoint(cp_s, wp).add_(adjoint(cn_s, wn))
            g = g * ax
            r = g if r is None else r + g
        outs.append(r)
    return stack(outs)
