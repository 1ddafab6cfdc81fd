"""Pooling (METHOD.md §3): max pools give each window's relevance to its winner (ties
split); average and adaptive pools split it by the add rule (∝ |a|) over the window.

Every pool is described the same way: per spatial dimension, the input positions each
output position reads (an [out, k] index table with a validity mask). Windows are gathered
as [..., out, k] — the size of an unfold, never [out, in] — and relevance is scattered back
with ``index_add_``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contract import RuleContext, RuleResult
from .registry import register_rule

if TYPE_CHECKING:
    from ..records import Record


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def window_table(L: int, O: int, k: int, s: int, p: int, d: int) -> tuple[Tensor, Tensor]:
    """Input positions [O, k] read by each output position of a regular pool."""
    idx = torch.arange(O)[:, None] * s - p + torch.arange(k)[None, :] * d
    return idx, (idx >= 0) & (idx < L)


def adaptive_table(L: int, O: int) -> tuple[Tensor, Tensor]:
    """Input positions read by each output position of an adaptive pool."""
    o = torch.arange(O)
    start = (o * L) // O
    end = -((-(o + 1) * L) // O)  # ceil
    k = int((end - start).max())
    idx = start[:, None] + torch.arange(k)[None, :]
    return idx, idx < end[:, None]


def pool_relevance(
    R: Tensor, x: Tensor, tables: Sequence[tuple[Tensor, Tensor]], kind: str
) -> tuple[Tensor, Tensor]:
    """Relevance on ``x`` from relevance ``R`` on a pool's output.

    ``tables``: one (index, valid) pair per spatial dim (last dims of ``x``); ``kind`` is
    ``"max"`` or ``"avg"``. Returns the input relevance and what was lost (windows whose
    inputs are all 0 under the add rule).
    """
    nd = len(tables)
    spatial = x.shape[-nd:]
    lead = x.shape[:-nd]
    dev = x.device
    # combined flat index of every (output position, window member)
    flat = torch.zeros((), dtype=torch.long, device=dev)
    valid = torch.ones((), dtype=torch.bool, device=dev)
    for (idx, ok), size in zip(tables, spatial):
        idx, ok = idx.to(dev), ok.to(dev)
        flat = flat[..., None, None] * size + idx
        valid = valid[..., None, None] & ok
    # axes are (O1, K1, O2, K2, ...): bring outputs first, window members last
    order = [2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)]
    flat = flat.permute(order).reshape(math.prod(t[0].shape[0] for t in tables), -1)
    valid = valid.permute(order).reshape(flat.shape)
    flat = torch.where(valid, flat, torch.zeros_like(flat))
    xs = x.reshape(*lead, -1)
    win = xs[..., flat]  # [*lead, O, K]
    Rw = R.reshape(*lead, -1, 1)
    if kind == "max":
        masked = torch.where(valid, win, torch.full_like(win, -math.inf))
        best = masked.amax(dim=-1, keepdim=True)
        share = ((masked == best) & valid).to(R.dtype)
    else:
        share = torch.where(valid, win.abs(), torch.zeros_like(win)).to(R.dtype)
    den = share.sum(-1, keepdim=True)
    contrib = Rw * share / torch.where(den == 0, torch.ones_like(den), den)
    out = R.new_zeros(*lead, xs.shape[-1])
    out.index_add_(-1, flat.reshape(-1), contrib.reshape(*lead, -1))
    lost = R.sum() - contrib.sum()
    return out.reshape(x.shape), lost


def regular_tables(x: Tensor, out_shape, kernel, stride, padding, dilation) -> list:
    nd = len(out_shape)
    k, s = _tuple(kernel, nd), _tuple(stride if stride else kernel, nd)
    p, d = _tuple(padding, nd), _tuple(dilation, nd)
    return [window_table(L, O, *a) for L, O, a in
            zip(x.shape[-nd:], out_shape, zip(k, s, p, d))]


def adaptive_tables(x: Tensor, out_shape) -> list:
    nd = len(out_shape)
    return [adaptive_table(L, O) for L, O in zip(x.shape[-nd:], out_shape)]


def adaptive_avg_pool_relevance(R: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """For functional ``F.adaptive_avg_pool*d(x, R.shape[-nd:])`` inside composite rules;
    the pooled dims are those of ``x`` beyond the leading two (batch, channels)."""
    nd = x.dim() - 2
    return pool_relevance(R, x, adaptive_tables(x, R.shape[-nd:]), "avg")


_MAX = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVG = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_MAX = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_ADAPTIVE_AVG = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_ND = {
    c: i + 1 for group in (_MAX, _AVG, _ADAPTIVE_MAX, _ADAPTIVE_AVG) for i, c in enumerate(group)
}


def _nd(rec) -> int:
    for cls in type(rec.module).__mro__:
        if cls in _ND:
            return _ND[cls]
    raise TypeError(rec.describe())


def unfold_pool_relevance(
    R: Tensor, x: Tensor, kernel, stride, padding, dilation, kind: str,
    out: Tensor | None = None, ceil_mode: bool = False,
) -> tuple[Tensor, Tensor] | None:
    """Fast path for regular 1d/2d pools: one strided view of the (padded) input per
    window offset — ``k`` element-wise passes over the output's size, no unfolded copy.

    Same result as :func:`pool_relevance`; ``None`` when the geometry does not fit.
    ``out``: the pool's recorded output (the window maxima), if intact. A max pool whose
    windows that carry relevance all have a single winner takes the winners' indices from
    ``max_pool2d_with_indices`` (channels-last: much faster than the default layout) and
    moves relevance with one ``scatter_add``.
    """
    one_d = x.dim() == 3
    if one_d:  # [N, C, L] -> [N, C, 1, L]
        x, R = x.unsqueeze(-2), R.unsqueeze(-2)
        out = None if out is None else out.unsqueeze(-2)
        kernel, stride = (1, _tuple(kernel, 1)[0]), (1, _tuple(stride or kernel, 1)[0])
        padding, dilation = (0, _tuple(padding, 1)[0]), (1, _tuple(dilation, 1)[0])
    elif x.dim() != 4:
        return None
    w = _Windows.of(x, R.shape[-2:], kernel, stride, padding, dilation, kind)
    if w is None:
        return None
    if kind == "max":
        best = out if out is not None and out.shape == R.shape else None
        if best is None:
            best = w.at(w.xp, w.offsets[0]).clone()
            for o in w.offsets[1:]:
                torch.maximum(best, w.at(w.xp, o), out=best)
        single = _single_winners(R, x, w, best, ceil_mode)
        if single is not None:
            R_x = single
            lost = R.sum() - R_x.sum()
            return (R_x.squeeze(-2) if one_d else R_x), lost
        # winners (ties split)
        shares = [torch.eq(w.at(w.xp, o), best).to(R.dtype) for o in w.offsets]
    else:
        shares = [w.at(w.xp, o).abs().to(R.dtype) for o in w.offsets]
    R_x = w.spread(R, shares)
    lost = R.sum() - R_x.sum()
    if one_d:
        R_x = R_x.squeeze(-2)
    return R_x.contiguous(), lost


@dataclass
class _Windows:
    """A regular 2d pool's windows over the padded input ``xp``: per spatial dim the
    kernel ``k``, stride ``s``, padding ``p`` and dilation ``d``, the input size ``HW`` and
    output size ``OHW``, and the offset of every window member (``offsets``)."""

    k: tuple[int, int]
    s: tuple[int, int]
    p: tuple[int, int]
    d: tuple[int, int]
    HW: tuple[int, int]
    OHW: tuple[int, int]
    xp: Tensor
    offsets: list[tuple[int, int]]

    @classmethod
    def of(cls, x: Tensor, out_hw, kernel, stride, padding, dilation,
           kind: str) -> _Windows | None:
        """The windows of the pool of ``x`` [N, C, H, W]; ``None`` when the geometry does
        not fit (an output would read beyond the padded input)."""
        k, s = _tuple(kernel, 2), _tuple(stride if stride else kernel, 2)
        p, d = _tuple(padding, 2), _tuple(dilation, 2)
        H, W = x.shape[-2:]
        OH, OW = out_hw
        extra = [max(0, (o - 1) * st + dd * (kk - 1) + 1 - (size + 2 * pp))
                 for o, st, dd, kk, size, pp in zip((OH, OW), s, d, k, (H, W), p)]
        fill = -math.inf if kind == "max" else 0.0
        xp = F.pad(x, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]), value=fill)
        if any((o - 1) * st + dd * (kk - 1) + 1 > size
               for o, st, dd, kk, size in zip((OH, OW), s, d, k, xp.shape[-2:])):
            return None
        offsets = [(i * d[0], j * d[1]) for i in range(k[0]) for j in range(k[1])]
        return cls((k[0], k[1]), (s[0], s[1]), (p[0], p[1]), (d[0], d[1]), (H, W), (OH, OW),
                   xp, offsets)

    def at(self, t: Tensor, offset: tuple[int, int]) -> Tensor:
        """The members of every window at one offset (a strided view of ``t``)."""
        (oy, ox), (OH, OW), s = offset, self.OHW, self.s
        return t[..., oy:oy + (OH - 1) * s[0] + 1:s[0], ox:ox + (OW - 1) * s[1] + 1:s[1]]

    def spread(self, R: Tensor, shares: list[Tensor]) -> Tensor:
        """Each window's relevance over its members ∝ ``shares`` (one per offset; they
        are overwritten), on the unpadded input."""
        den = shares[0].clone()
        for sh in shares[1:]:
            den.add_(sh)
        q = torch.div(R, den, out=den).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        Rp = R.new_zeros(self.xp.shape)
        for sh, o in zip(shares, self.offsets):
            self.at(Rp, o).add_(sh.mul_(q))
        (H, W), p = self.HW, self.p
        return Rp[..., p[0]:p[0] + H, p[1]:p[1] + W]


def _single_winners(R: Tensor, x: Tensor, w: _Windows, best: Tensor,
                    ceil_mode: bool) -> Tensor | None:
    """Max pool relevance by the winners' indices, or ``None`` when a window that carries
    relevance has tied maxima (counted over the padded input ``w.xp``: the split needs the
    general path) or the geometry is not what ``max_pool2d`` reproduces."""
    if not x.is_floating_point() or x.dtype != R.dtype:
        return None
    count = None
    for o in w.offsets:
        hit = torch.eq(w.at(w.xp, o), best)
        count = hit.to(torch.uint8) if count is None else count.add_(hit)
    if bool(((count > 1) & (R != 0)).any()):
        return None
    N, C = x.shape[0], x.shape[1]
    xl = x.contiguous(memory_format=torch.channels_last)
    got, idx = F.max_pool2d_with_indices(xl, w.k, w.s, w.p, w.d, ceil_mode)
    if got.shape != R.shape:
        return None
    R_x = R.new_zeros(N, C, x.shape[-2] * x.shape[-1])
    R_x.scatter_add_(-1, idx.reshape(N, C, -1), R.reshape(N, C, -1))
    return R_x.view(x.shape)


def pool_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """Any nn pooling module (regular or adaptive, max or average, 1d/2d/3d)."""
    m, x, R = rec.module, rec.input_value(0), R_out[0]
    nd = _nd(rec)
    out_shape = rec.outputs[0].shape[-nd:]
    kind = "max" if isinstance(m, _MAX + _ADAPTIVE_MAX) else "avg"
    if nd in (1, 2) and not isinstance(m, _ADAPTIVE_MAX + _ADAPTIVE_AVG) and x.dim() == nd + 2:
        out = rec.output_value(0) if kind == "max" and rec.output_intact(0) else None
        fast = unfold_pool_relevance(R, x, m.kernel_size, m.stride, m.padding,
                                     getattr(m, "dilation", 1), kind, out,
                                     getattr(m, "ceil_mode", False))
        if fast is not None:
            return RuleResult([fast[0]], fast[1])
    if isinstance(m, _ADAPTIVE_MAX + _ADAPTIVE_AVG):
        tables = adaptive_tables(x, out_shape)
    else:
        dil = getattr(m, "dilation", 1)
        tables = regular_tables(x, out_shape, m.kernel_size, m.stride, m.padding, dil)
    R_x, lost = pool_relevance(R, x, tables, kind)
    return RuleResult([R_x], lost)


for _cls in _ND:
    register_rule(_cls, pool_rule, streamwise=True, name="pool")
