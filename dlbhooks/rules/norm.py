"""Normalisation layers (METHOD.md §3): statistics are constants, so relevance passes
``x -> x̂`` element-wise; the affine part ``γ·x̂ + β`` is the §2 rule element-wise, with β's
share absorbed. RMSNorm has no β and passes everything."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .arith import fits, nonneg_div, reduce_to
from .contract import RuleContext, RuleResult
from .functional import close_to_recorded
from .registry import register_rule

if TYPE_CHECKING:
    from ..records import Record


def affine_split(R: Tensor, scaled: Tensor, beta: Tensor | None,
                 own: bool = False, babs: Tensor | None = None,
                 positive: bool | None = None) -> tuple[Tensor, Tensor]:
    """``y = scaled + β`` element-wise: ``R_x = R·|scaled| / (|scaled| + |β|)``. ``own``:
    ``scaled`` is the caller's temporary (overwritten). What β keeps, ``Σ (R/den)·|β|``,
    is summed per β entry first (one reduction, no extra full-size tensor). ``babs``:
    ``|β|`` if the caller has it, ``positive``: whether all of it is > 0, if known."""
    if beta is None:
        return R, R.new_zeros(())
    babs = beta.abs() if babs is None else babs
    mag = scaled.abs_() if own else scaled.abs()
    den = mag + babs
    if positive is None:
        positive = bool((babs > 0).all())
    if positive:  # den >= |β| > 0: no guard needed
        q = torch.div(R, den, out=den) if fits(den, R) else R / den
        lost = (reduce_to(q, babs.shape) * babs).sum()
    else:
        q = nonneg_div(R, den, own=True)
        lost = None
    R_x = q.mul_(mag) if fits(q, mag) else q * mag
    if lost is None:
        lost = R.sum() - R_x.sum()
    return R_x, lost


def _channel_view(p: Tensor | None, ndim: int) -> Tensor | None:
    return None if p is None else p.view(1, -1, *([1] * (ndim - 2)))


def _beta(ctx: RuleContext, m: nn.Module, ndim: int | None = None) -> dict:
    """β, |β| (cached across explanations) and whether all of |β| is > 0, as keyword
    arguments of :func:`affine_split` (β and |β| viewed per channel when ``ndim``)."""
    beta, (babs, positive) = ctx.param(m, "bias"), ctx.abs_bias(m)
    if beta is None or babs is None:
        return {"beta": None}
    if ndim is not None:
        beta, babs = _channel_view(beta, ndim), _channel_view(babs, ndim)
    return {"beta": beta, "babs": babs, "positive": positive}


def _channel_affine(R: Tensor, xhat: Tensor, m: nn.Module, ctx: RuleContext) -> RuleResult:
    """``y = γ_c·x̂ + β_c`` per channel (dim 1): the §2 split with β absorbed."""
    gamma = _channel_view(ctx.param(m, "weight"), xhat.dim())
    scaled = xhat.mul_(gamma) if gamma is not None else xhat
    R_x, absorbed = affine_split(R, scaled, own=True, **_beta(ctx, m, xhat.dim()))
    return RuleResult([R_x], absorbed)


def _layer_norm_fits(rec: Record) -> bool:
    """Does the recorded call compute ``F.layer_norm`` over the last dims, as
    ``nn.LayerNorm``? (A channel-first subclass does not.)"""
    m = rec.module
    x, y = rec.inputs[0], rec.outputs[0] if rec.outputs else None
    shape = tuple(m.normalized_shape)
    if y is None or tuple(x.shape[-len(shape):]) != shape or y.shape != x.shape:
        return False
    w = m.weight if isinstance(m.weight, Tensor) and m.weight.device.type != "meta" else None
    b = m.bias if isinstance(m.bias, Tensor) and m.bias.device.type != "meta" else None
    want = F.layer_norm(x, shape, w, b, m.eps)
    return close_to_recorded(want, y)


@register_rule(nn.LayerNorm, streamwise=True, name="layer_norm", check=_layer_norm_fits)
def layer_norm_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    m = rec.module
    x = rec.input_value(0)
    gamma = ctx.param(m, "weight")
    xhat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    scaled = xhat.mul_(gamma) if gamma is not None else xhat
    R_x, absorbed = affine_split(R_out[0], scaled, own=True, **_beta(ctx, m))
    return RuleResult([R_x], absorbed)


@register_rule(nn.modules.batchnorm._BatchNorm, streamwise=True, name="batch_norm")
def batch_norm_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    m = rec.module
    if rec.output_intact(0):  # |γ·x̂| = |y - β|: no need to normalise again
        y = rec.output_value(0)
        beta = _beta(ctx, m, y.dim())
        scaled = y - beta["beta"] if beta["beta"] is not None else y
        R_x, absorbed = affine_split(R_out[0], scaled, own=beta["beta"] is not None, **beta)
        return RuleResult([R_x], absorbed)
    x = rec.input_value(0)
    rm, rv = ctx.param(m, "running_mean"), ctx.param(m, "running_var")
    use_batch = m.training or rm is None
    xhat = F.batch_norm(
        x, None if use_batch else rm, None if use_batch else rv, None, None,
        training=use_batch, momentum=0.0, eps=m.eps,
    )
    return _channel_affine(R_out[0], xhat, m, ctx)


@register_rule(nn.GroupNorm, streamwise=True, name="group_norm")
def group_norm_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    m = rec.module
    x = rec.input_value(0)
    xhat = F.group_norm(x, m.num_groups, None, None, m.eps)
    return _channel_affine(R_out[0], xhat, m, ctx)


@register_rule(nn.modules.instancenorm._InstanceNorm, streamwise=True, name="instance_norm")
def instance_norm_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    m = rec.module
    x = rec.input_value(0)
    xhat = F.instance_norm(x, None, None, None, None, True, 0.0, m.eps)
    return _channel_affine(R_out[0], xhat, m, ctx)


@register_rule(nn.RMSNorm, name="rms_norm")
def rms_norm_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """No β: ``y = γ·x̂`` is a product with a parameter, all relevance to the activation."""
    return RuleResult([R_out[0]])
