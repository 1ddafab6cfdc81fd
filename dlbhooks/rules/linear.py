"""Weighted-sum layers: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Bilinear (METHOD.md §2)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from ..relevance import Streams, rmap
from .core import coefficients, weighted_sum
from .registry import register_rule


def _linear_fwd(x, W):
    return x @ W.T


def _linear_adj(s, W):
    return s @ W


@register_rule(nn.Linear)
def linear_rule(rec, R_out, ctx):
    """§2 on ``y = x Wᵀ + b``: two matrix products with |W| (three with saturation).

    Rows (positions) without relevance are skipped when they are the majority (an LM head
    explained at one position): the result is the same, the products are much smaller."""
    m = rec.module
    W, b = ctx.param(m, "weight"), ctx.param(m, "bias")
    a = rec.input_value(0)
    out = rec.outputs[0] if rec.output_intact(0) else None
    R = R_out[0]
    bounds = ctx.bounds_after(rec)
    rows = _live_rows(R) if a.dim() > 1 else None
    if rows is not None:
        pick = lambda t: t.reshape(-1, t.shape[-1])[rows]  # noqa: E731
        R_sub, absorbed = weighted_sum(
            rmap(pick, R), pick(a), W, b, _linear_fwd, _linear_adj, bounds=bounds,
            output=None if out is None else pick(out),
        )

        def place(r):
            full = r.new_zeros(a.numel() // a.shape[-1], a.shape[-1])
            full[rows] = r
            return full.view(a.shape)

        return [rmap(place, R_sub)], absorbed
    R_in, absorbed = weighted_sum(
        R, a, W, b, _linear_fwd, _linear_adj, bounds=bounds, output=out
    )
    return [R_in], absorbed


def _live_rows(R):
    """Indices of the rows that carry relevance, if they are fewer than half of them."""
    t = R.pos.abs() + R.neg.abs() if isinstance(R, Streams) else R.abs()
    t = t.reshape(-1, t.shape[-1])
    if t.shape[0] < 4:
        return None
    live = (t != 0).any(-1)
    n = int(live.sum())
    return live.nonzero().squeeze(-1) if n * 2 <= t.shape[0] else None


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


def _conv_rule(rec, R_out, ctx, conv):
    m = rec.module
    _check_padding_mode(rec)
    W, b = ctx.param(m, "weight"), ctx.param(m, "bias")
    a = rec.input_value(0)
    fwd = lambda x, w: conv(x, w, None, m.stride, m.padding, m.dilation, m.groups)  # noqa: E731
    adj = None
    if not isinstance(m.padding, str) and a.dim() == W.dim():  # batched, integer padding
        nd = a.dim() - 2

        def adj(s, w):  # the transpose of the convolution: one convolution_backward
            return torch.ops.aten.convolution_backward(
                s, a, w, None, m.stride, m.padding, m.dilation, False, [0] * nd, m.groups,
                [True, False, False],
            )[0]

    out = rec.outputs[0] if rec.output_intact(0) else None
    R, absorbed = weighted_sum(
        R_out[0], a, W, _bias_view(b, a.dim()), fwd, adj,
        bounds=ctx.bounds_after(rec), output=out,
    )
    return [R], absorbed


def _convt_rule(rec, R_out, ctx, convt):
    m = rec.module
    _check_padding_mode(rec)
    W, b = ctx.param(m, "weight"), ctx.param(m, "bias")
    a = rec.input_value(0)
    out_size = rec.outputs[0].shape[2:]
    op = m._output_padding(a, list(out_size), m.stride, m.padding, m.kernel_size,
                           a.dim() - 2, m.dilation)
    fwd = lambda x, w: convt(x, w, None, m.stride, m.padding, op, m.groups, m.dilation)  # noqa: E731
    out = rec.outputs[0] if rec.output_intact(0) else None
    R, absorbed = weighted_sum(
        R_out[0], a, W, _bias_view(b, a.dim()), fwd, None,
        bounds=ctx.bounds_after(rec), output=out,
    )
    return [R], absorbed


for _cls, _fn in _CONV.items():
    register_rule(_cls, partial(_conv_rule, conv=_fn), name=f"conv:{_cls.__name__}")
for _cls, _fn in _CONVT.items():
    register_rule(_cls, partial(_convt_rule, convt=_fn), name=f"conv_transpose:{_cls.__name__}")


@register_rule(nn.Bilinear)
def bilinear_rule(rec, R_out, ctx):
    """§2 over the pair contributions ``W_kij x1_i x2_j``; each pair's share goes half to
    ``x1_i`` and half to ``x2_j`` (the product rule of §3)."""
    m = rec.module
    W, b = ctx.param(m, "weight"), ctx.param(m, "bias")
    x1, x2 = rec.input_value(0), rec.input_value(1)
    absW, a1, a2 = W.abs(), x1.abs(), x2.abs()
    abs_total = F.bilinear(a1, a2, absW)
    R = R_out[0]
    need_signed = isinstance(R, Streams) or ctx.bounds_after(rec) is not None
    signed = F.bilinear(x1, x2, W) if need_signed else None
    coefs, absorbed = coefficients(R, abs_total, signed, b, bounds=ctx.bounds_after(rec))
    r1s, r2s = [], []
    for c_abs, c_sgn in coefs:
        r1 = a1 * torch.einsum("...k,kij,...j->...i", c_abs, absW, a2)
        r2 = a2 * torch.einsum("...k,kij,...i->...j", c_abs, absW, a1)
        if c_sgn is not None:
            r1 = r1 + x1 * torch.einsum("...k,kij,...j->...i", c_sgn, W, x2)
            r2 = r2 + x2 * torch.einsum("...k,kij,...i->...j", c_sgn, W, x1)
        r1s.append(r1 * 0.5)
        r2s.append(r2 * 0.5)
    if isinstance(R, Streams):
        return [Streams(*r1s), Streams(*r2s)], absorbed
    return [r1s[0], r2s[0]], absorbed
