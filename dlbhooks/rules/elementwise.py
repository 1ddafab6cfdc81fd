"""Element-wise modules and the add / product helpers of METHOD.md §3.

Activations, Dropout, Identity, Flatten and Unflatten pass relevance through (moved with
the data). Their saturation bounds, used by the preceding weighted sum, are data:
:data:`SATURATION_BOUNDS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..relevance import rsum
from .arith import broadcasts_into, fits, nonneg_div, reduce_stacked, reduce_to
from .contract import RuleResult
from .registry import register_rule

if TYPE_CHECKING:
    from ..records import Record
    from .contract import RuleContext

#: (lower, upper) bound on the pre-activation beyond which the activation is saturated.
SATURATION_BOUNDS: dict[type | str, tuple[float | None, float | None]] = {
    nn.Tanh: (-2.0, 2.0),
    nn.Sigmoid: (-4.0, 4.0),
    nn.Softmax: (-1.0, 2.0),
    nn.SiLU: (-6.0, None),
    nn.ReLU: (0.0, None),
}


def register_saturation(
    module_type: type | str, lower: float | None, upper: float | None
) -> None:
    """Declare the saturated range of an activation module type (or its dotted class name,
    e.g. ``"transformers.activations.SiLUActivation"``, so no import is needed)."""
    SATURATION_BOUNDS[module_type] = (lower, upper)


def saturation_bounds(module: nn.Module) -> tuple[float | None, float | None] | None:
    for cls in type(module).__mro__:
        if cls in SATURATION_BOUNDS:
            return SATURATION_BOUNDS[cls]
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in SATURATION_BOUNDS:
            return SATURATION_BOUNDS[name]
    return None


#: Modules whose output is never negative: a weighted sum reading it needs no |a|.
NONNEGATIVE: tuple[type, ...] = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softmax, nn.Hardsigmoid,
                                 nn.Softplus)


def nonnegative_output(module: nn.Module) -> bool:
    return isinstance(module, NONNEGATIVE)


PASSTHROUGH = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softmax, nn.LogSoftmax, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Identity, nn.Flatten, nn.Unflatten,
)


def passthrough_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """Relevance moves with the data: element-wise maps and reshapes. The same tensor
    object when the shape does not change (the ledger then sums it once)."""
    R, shape = R_out[0], rec.inputs[0].shape
    assert R is not None  # the engine fills missing outputs with zeros
    return RuleResult([R if R.shape[1:] == shape else R.reshape(R.shape[0], *shape)])


for _cls in PASSTHROUGH:
    register_rule(_cls, passthrough_rule, name="passthrough")


def add_rule(R: Tensor, terms: list[Tensor],
             stacked: bool = False) -> tuple[list[Tensor], Tensor]:
    """``y = sum_k a_k`` (broadcasting): ``R_k = R |a_k| / sum |a|``; zeros where all vanish.

    Returns the relevance of each term (reduced to its shape) and what was lost (positions
    where every term is 0). ``stacked``: ``R`` has a leading axis of relevances split alike
    (streams, targets), kept in the terms' relevance; what was lost is per entry (``[S]``).
    """
    mags = [t.abs() for t in terms]
    total = mags[0] + mags[1] if len(mags) > 1 else mags[0].clone()
    for m in mags[2:]:
        total.add_(m)
    zero = None if total.numel() == 0 or float(total.amin()) > 0 else total == 0
    s = nonneg_div(R, total, own=True, positive=zero is None)
    reduce = reduce_stacked if stacked else reduce_to
    parts = []
    for k, (m, t) in enumerate(zip(mags, terms)):
        full = broadcasts_into(s.shape, m.shape) and m.dtype == s.dtype
        if full:
            part = m.mul_(s)
        elif k == len(terms) - 1 and fits(s, m):  # (s is this rule's own: the last may
            part = s.mul_(m)  # overwrite it, e.g. several targets' [k, ...] shares)
        else:
            part = s * m
        parts.append(reduce(part, t.shape))
    if zero is None:
        return parts, R.new_zeros((R.shape[0],) if stacked else ())
    lost = torch.where(zero, R, 0.0)
    return parts, rsum(lost) if stacked else lost.sum()


def product_rule(R: Tensor, factors: list[Tensor]) -> list[Tensor]:
    """``y = a * b`` of two activations: half of ``R`` to each factor (AttnLRP uniform rule)."""
    half = R / len(factors)
    return [reduce_to(half, f.shape) for f in factors]
