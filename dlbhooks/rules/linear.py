"""Weighted-sum layers: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Bilinear (METHOD.md §2)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from ..relevance import stack
from .arith import nonzero_along
from .composite import linear_adj, linear_fwd, linear_into
from .contract import RuleContext, RuleResult, per_target
from .core import (
    _sign_parts,
    coefficients,
    contrastive_side_coefficients,
    contrastive_split,
    weighted_sum,
)
from .registry import register_rule

if TYPE_CHECKING:
    from ..records import Record

LIVE_UNITS_MIN = 4096  # output units from which a Linear looks for the few live ones


def exact_output(rec: Record, ctx: RuleContext, i: int = 0) -> Tensor | None:
    """Output ``i`` of ``rec`` if it is exactly what the module computed (intact, and not
    stored cast to another dtype), else ``None``: the §2 split may read a weighted sum's
    signed total from its output only if that is the sum of the contributions it splits."""
    if not rec.output_intact(i):
        return None
    out, cast = rec.outputs[i], ctx.compute_dtype
    return out if cast is None or cast == out.dtype else None


@register_rule(nn.Linear)
def linear_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """§2 on ``y = x Wᵀ + b``: two matrix products with |W| (three with saturation).

    Rows (positions) without relevance are skipped when they are the majority (an LM head
    explained at one position), and so are output units without relevance when they are
    the vast majority (the LM head's vocabulary): the result is the same, the products
    (and |W|) are much smaller."""
    m = rec.module
    W, b = ctx.param(m, "weight"), ctx.param(m, "bias")
    a = rec.input_value(0)
    out = exact_output(rec, ctx)
    R = R_out[0]
    assert R is not None and W is not None
    bounds = ctx.bounds_after(rec)
    rows = _live_rows(R) if a.dim() > 1 else None
    if rows is not None:
        pick = lambda t: t.reshape(-1, t.shape[-1])[rows]  # noqa: E731
        S, d = R.shape[0], a.shape[-1]
        R_sub, absorbed = _linear_units(R.reshape(S, -1, R.shape[-1])[:, rows], pick(a), W,
                                        b, bounds, None if out is None else pick(out),
                                        abs_params=lambda: _abs_params(ctx, m, rec))
        full = R_sub.new_zeros(S, a.numel() // d, d)
        full[:, rows] = R_sub
        return RuleResult([full.view(S, *a.shape)], absorbed)
    R_in, absorbed = _linear_units(R, a, W, b, bounds, out, ctx.shared(rec),
                                   abs_params=lambda: _abs_params(ctx, m, rec))
    return RuleResult([R_in], absorbed)


def _abs_params(ctx: RuleContext, m: nn.Module, rec: Record) -> dict:
    """``|W|``, ``|b|`` (cached across explanations), whether every ``|b|`` is > 0 and
    whether the input is known to be non-negative."""
    absb, positive = ctx.abs_bias(m)
    return {"abs_weight": ctx.abs_param(m, "weight", transient=True), "abs_bias": absb,
            "bias_positive": positive, "nonneg_input": ctx.nonnegative_input(rec, 0)}


def _linear_units(R, a, W, b, bounds, out, shared=None, abs_params=None):
    """``weighted_sum`` for a Linear, restricted to the output units that carry relevance
    when they are at most a quarter of them (units without relevance give nothing). Only
    wide layers are checked (an LM head's vocabulary): for the others the check costs more
    than the smaller products save."""
    units = _live_units(R) if W.shape[0] >= LIVE_UNITS_MIN else None
    if units is not None:
        pick = lambda t: t.index_select(-1, units)  # noqa: E731
        R, W = pick(R), W.index_select(0, units)
        abs_params = None  # |W| of the few live units only (an LM head's whole vocabulary
        # would cost more than the products)
        b = None if b is None else b.index_select(0, units)
        out = None if out is None else pick(out)
        if isinstance(bounds, tuple):
            bounds = tuple(x.index_select(-1, units) if isinstance(x, torch.Tensor)
                           and x.dim() and x.shape[-1] > 1 else x for x in bounds)
        shared = None  # denominators of a subset of units: not reusable
    return weighted_sum(R, a, W, b, linear_fwd, linear_adj, bounds=bounds, output=out,
                        shared=shared, forward_into=linear_into,
                        **({} if abs_params is None else abs_params()))


def _live_along(R: Tensor, dim: int) -> Tensor:
    """Bool: does some stream (of the stacked ``R``) have a non-zero entry along ``dim``
    (of one stream)?"""
    live = nonzero_along(R[0], dim)
    for r in R.unbind(0)[1:]:
        live = live | nonzero_along(r, dim)
    return live


def _live_rows(R: Tensor) -> Tensor | None:
    """Indices of the rows that carry relevance, if they are fewer than half of them.
    About eight columns decide quickly when most rows are live (one column is not enough
    after a ReLU, which silences a unit for many rows)."""
    t = R[0]
    n_rows = t.numel() // t.shape[-1] if t.dim() and t.shape[-1] else 0
    if n_rows < 4:
        return None
    flat_t = t.reshape(n_rows, -1)
    sample = flat_t[:, :: max(1, flat_t.shape[1] // 8)]  # about 8 columns
    if int(torch.count_nonzero(sample.abs().amax(-1))) * 2 > n_rows:
        return None  # most rows are live (seen in a few columns): no need to look further
    live = _live_along(R.reshape(R.shape[0], n_rows, R.shape[-1]), -1)
    n = int(live.sum())
    return live.nonzero().squeeze(-1) if n * 2 <= n_rows else None


def _live_units(R: Tensor) -> Tensor | None:
    """Indices of the output units (last dim) that carry relevance in some row, if they
    are at most a quarter of them."""
    t = R[0]
    if t.dim() == 0 or t.numel() == 0:
        return None
    flat = R.reshape(R.shape[0], -1, R.shape[-1])
    if int(torch.count_nonzero(t.reshape(-1, t.shape[-1])[0])) * 4 > t.shape[-1]:
        return None  # one row alone has too many live units
    live = _live_along(flat, 0)
    n = int(live.sum())
    return live.nonzero().squeeze(-1) if n * 4 <= live.numel() else None


_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
_CONVT = {
    nn.ConvTranspose1d: F.conv_transpose1d,
    nn.ConvTranspose2d: F.conv_transpose2d,
    nn.ConvTranspose3d: F.conv_transpose3d,
}


def _bias_view(b, ndim):
    return None if b is None else b.view(1, -1, *([1] * (ndim - 2)))


def _check_padding_mode(rec):
    mode = getattr(rec.module, "padding_mode", "zeros")
    if mode != "zeros":
        raise UnsupportedModuleError(
            f"{rec.describe()} uses padding_mode={mode!r}; dlbhooks supports 'zeros' only. "
            "Register a rule for this module type with @dlb.register_rule."
        )


def _polyphase_fits(m, a) -> bool:
    """A 2-d convolution with few input channels (an image stem): its transpose is much
    faster as one forward convolution over the stride phases than as
    ``convolution_backward``, which is slow when it must produce few channels."""
    return (a.dim() == 4 and m.groups == 1 and a.shape[1] <= 4
            and tuple(m.dilation) == (1, 1) and max(m.kernel_size) > 1)


def _polyphase_adjoint(s, w, in_hw, stride, padding):
    """The transpose of ``conv2d(x, w, stride, padding)`` applied to ``s``, as one forward
    convolution: input row ``u = oy·sh + ky`` (padded) with ``ky = qy·sh + py`` is
    ``(oy + qy)·sh + py``, so each phase ``(py, px)`` is a full correlation of ``s`` with the
    flipped sub-kernel ``w[..., qy·sh + py, qx·sw + px]``; all phases are output channels."""
    O, C, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    qy, qx = -(-kh // sh), -(-kw // sw)
    wp = F.pad(w, (0, qx * sw - kw, 0, qy * sh - kh))
    wr = wp.view(O, C, qy, sh, qx, sw).permute(3, 5, 1, 0, 2, 4).flip(-1, -2)
    g = F.conv2d(s, wr.reshape(sh * sw * C, O, qy, qx), padding=(qy - 1, qx - 1))
    N, _, gy, gx = g.shape
    g = g.view(N, sh, sw, C, gy, gx).permute(0, 3, 4, 1, 5, 2).reshape(N, C, gy * sh, gx * sw)
    H, W = in_hw
    g = g[..., ph:ph + H, pw:pw + W]
    if tuple(g.shape[-2:]) != (H, W):  # input rows/columns no output reads: 0
        g = F.pad(g, (0, W - g.shape[-1], 0, H - g.shape[-2]))
    return g.contiguous()


def _conv_call(rec: Record, ctx: RuleContext) -> tuple[Any, Tensor, Tensor | None, Tensor]:
    """The module of a recorded convolution call, its weight, its bias and the input."""
    m = rec.module
    _check_padding_mode(rec)
    return m, ctx.param(m, "weight"), ctx.param(m, "bias"), rec.input_value(0)


def _conv_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext,
               conv: Callable[..., Tensor]) -> RuleResult:
    m, W, b, a = _conv_call(rec, ctx)
    fwd = lambda x, w: conv(x, w, None, m.stride, m.padding, m.dilation, m.groups)  # noqa: E731
    adj = None
    if not isinstance(m.padding, str) and a.dim() == W.dim():  # batched, integer padding
        nd = a.dim() - 2
        if _polyphase_fits(m, a):
            def adj(s, w):
                return _polyphase_adjoint(s, w, a.shape[-2:], m.stride, m.padding)
        else:
            def adj(s, w):  # the transpose of the convolution: one convolution_backward
                # (only the input's shape is read: a stand-in, so that ``s`` may hold
                # several streams along the batch)
                shape = (s.shape[0], *a.shape[1:])
                stand_in = a if s.shape[0] == a.shape[0] else s.new_empty(1).expand(shape)
                return torch.ops.aten.convolution_backward(
                    s, stand_in, w, None, m.stride, m.padding, m.dilation, False,
                    [0] * nd, m.groups, [True, False, False],
                )[0]

    out = exact_output(rec, ctx)
    absb, positive = ctx.abs_bias(m)
    R, absorbed = weighted_sum(
        R_out[0], a, W, _bias_view(b, a.dim()), fwd, adj,
        bounds=ctx.bounds_after(rec), output=out,
        abs_weight=ctx.abs_param(m, "weight", transient=True),
        abs_bias=_bias_view(absb, a.dim()),
        bias_positive=positive,
        nonneg_input=ctx.nonnegative_input(rec, 0),
    )
    return RuleResult([R], absorbed)


def _convt_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext,
                convt: Callable[..., Tensor]) -> RuleResult:
    m, W, b, a = _conv_call(rec, ctx)
    out_size = rec.outputs[0].shape[2:]
    op = m._output_padding(a, list(out_size), m.stride, m.padding, m.kernel_size,
                           a.dim() - 2, m.dilation)
    fwd = lambda x, w: convt(x, w, None, m.stride, m.padding, op, m.groups, m.dilation)  # noqa: E731
    out = exact_output(rec, ctx)
    R, absorbed = weighted_sum(
        R_out[0], a, W, _bias_view(b, a.dim()), fwd, None,
        bounds=ctx.bounds_after(rec), output=out,
        abs_weight=ctx.abs_param(m, "weight", transient=True),
    )
    return RuleResult([R], absorbed)


for _conv_cls, _conv_fn in _CONV.items():
    register_rule(_conv_cls, partial(_conv_rule, conv=_conv_fn),
                  name=f"conv:{_conv_cls.__name__}")
for _convt_cls, _convt_fn in _CONVT.items():
    register_rule(_convt_cls, partial(_convt_rule, convt=_convt_fn),
                  name=f"conv_transpose:{_convt_cls.__name__}")


@register_rule(nn.Bilinear)
@per_target
def bilinear_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """§2 over the pair contributions ``W_kij x1_i x2_j``; each pair's share goes half to
    ``x1_i`` and half to ``x2_j`` (the product rule of §3)."""
    m = rec.module
    W, b = ctx.param(m, "weight"), ctx.param(m, "bias")
    x1, x2 = rec.input_value(0), rec.input_value(1)
    R = R_out[0]
    assert R is not None and W is not None
    if ctx.contrastive:
        return _bilinear_contrastive(R, x1, x2, W, b)
    absW, a1, a2 = W.abs(), x1.abs(), x2.abs()
    abs_total = F.bilinear(a1, a2, absW)
    need_signed = ctx.bounds_after(rec) is not None
    signed = F.bilinear(x1, x2, W) if need_signed else None
    coefs, absorbed = coefficients(R[0], abs_total, signed, b, bounds=ctx.bounds_after(rec))
    r1s, r2s = [], []
    for c_abs, c_sgn in coefs:
        r1 = a1 * torch.einsum("...k,kij,...j->...i", c_abs, absW, a2)
        r2 = a2 * torch.einsum("...k,kij,...i->...j", c_abs, absW, a1)
        if c_sgn is not None:
            r1 = r1 + x1 * torch.einsum("...k,kij,...j->...i", c_sgn, W, x2)
            r2 = r2 + x2 * torch.einsum("...k,kij,...i->...j", c_sgn, W, x1)
        r1s.append(r1 * 0.5)
        r2s.append(r2 * 0.5)
    return RuleResult([r1s[0].unsqueeze(0), r2s[0].unsqueeze(0)], absorbed.reshape(1))


def _bilinear_contrastive(R: Tensor, x1: Tensor, x2: Tensor, W: Tensor,
                          b: Tensor | None) -> RuleResult:
    """Contrastive §2 on Bilinear with each unit's sides summed directly: a pair
    contribution's sign is sign(W) sign(x1) sign(x2), so over the (up to 4) sign parts of
    ``x1`` and ``x2`` (magnitudes, from ``rules/core._sign_parts``) the weights making
    positive pairs are ``W⁺`` or ``W⁻`` and the others make negative ones: P and N are
    sums of products of non-negative factors, and so is the way back (no cancellation,
    which made a small side's 1/side off by ``eps (P + N) / side`` and its stream leak)."""
    # (x1 part, x2 part, [weights of positive pairs; of negative pairs]): against a part of
    # x1, the pairs are those of x2 with the signed weights wp - wn (= ±W, exactly)
    combos = [(a1, a2, torch.cat([p, n])) for a1, wp, wn in _sign_parts(x1, W, False)
              for a2, p, n in _sign_parts(x2, wp - wn, False)]
    PN = None  # [P | N] along the units
    for a1, a2, Wc in combos:
        pn = F.bilinear(a1, a2, Wc)
        PN = pn if PN is None else PN.add_(pn)
    P, N = PN.split(W.shape[0], dim=-1)
    split = contrastive_split(P, N, P - N, b)
    pairs, absorbed = contrastive_side_coefficients(R, split)
    r1s, r2s = [], []
    for cp, cn in pairs:
        c = torch.cat([cp, cn], dim=-1)  # [cp | cn] against [W_P; W_N]
        r1 = r2 = None
        for a1, a2, Wc in combos:
            g1 = a1 * torch.einsum("...k,kij,...j->...i", c, Wc, a2)
            g2 = a2 * torch.einsum("...k,kij,...i->...j", c, Wc, a1)
            r1, r2 = (g1, g2) if r1 is None else (r1.add_(g1), r2.add_(g2))
        r1s.append(r1.mul_(0.5))
        r2s.append(r2.mul_(0.5))
    return RuleResult([stack(r1s), stack(r2s)], absorbed)
