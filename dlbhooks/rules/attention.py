"""Attention (METHOD.md §4): a reusable relevance core and the ``nn.MultiheadAttention`` rule.

:func:`attention_relevance` takes relevance on the per-head attention output ``O = A·V`` and
returns relevance on ``Q``, ``K`` and ``V``. It recomputes ``A = softmax(Q·Kᵀ·scale + mask)``
in chunks of queries (attention probabilities are never stored by the tracer), handles
grouped-query attention, boolean and additive masks and GPT-OSS-style attention sinks, and
reports everything it cannot pass on, so that ``R_Q + R_K + R_V + absorbed = R_O``.
Model-specific rules (``nn.MultiheadAttention`` here, Hugging Face attention elsewhere) only
have to rebuild ``Q``, ``K``, ``V`` and run the projections through the §2 rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import scratch
from ..errors import UnsupportedModuleError
from ..relevance import Rel, radd, rmap, streams_of
from ..weights import fetch_param
from .arith import broadcasts_into, nonzero_along, safe_div
from .composite import linear_adj, linear_fwd
from .contract import RuleContext, RuleResult
from .core import weighted_sum
from .registry import register_rule

if TYPE_CHECKING:
    from ..records import Record

__all__ = [
    "AttentionRelevance",
    "attention_output",
    "attention_probabilities",
    "attention_relevance",
    "mha_recompute",
]

#: Default number of queries processed at once (peak memory ~ batch·heads·chunk·T_k).
DEFAULT_CHUNK = 128


class AttentionRelevance(NamedTuple):
    """Result of :func:`attention_relevance` (unpacks as ``R_Q, R_K, R_V, absorbed``)."""

    R_Q: Rel
    R_K: Rel
    R_V: Rel
    absorbed: Rel


# -- layout: grouped-query attention as [batch, kv_heads, group, T, d] ----------------------


@dataclass
class _Layout:
    B: int
    H: int
    Hkv: int
    g: int
    Tq: int
    Tk: int
    d: int
    dv: int
    Q: Tensor  # [B, Hkv, g, Tq, d]
    K: Tensor  # [B, Hkv, 1, Tk, d]
    V: Tensor  # [B, Hkv, 1, Tk, dv]
    mask: Tensor | None  # [b, hkv, gg, tq, Tk], broadcastable
    sinks: Tensor | None  # [b, hkv, gg, tq, 1], broadcastable
    dtype: torch.dtype  # computation dtype


def _broadcasts(shape: torch.Size, target: tuple[int, ...]) -> bool:
    try:
        return tuple(torch.broadcast_shapes(shape, target)) == target
    except RuntimeError:
        return False


def _group_heads(t: Tensor, H: int, Hkv: int, g: int, what: str) -> Tensor:
    """A 4-d tensor broadcastable over [B, H, ., .] -> 5-d [B, Hkv|1, g|1, ., .]."""
    if t.shape[1] == 1:
        return t.unsqueeze(2)
    if t.shape[1] == H:
        return t.reshape(t.shape[0], Hkv, g, *t.shape[2:])
    raise ValueError(f"{what} has {t.shape[1]} heads; expected 1 or {H}")


def _layout(Q: Tensor, K: Tensor, V: Tensor, mask: Tensor | None, sinks: Tensor | None) -> _Layout:
    if Q.dim() != 4 or K.dim() != 4 or V.dim() != 4:
        raise ValueError(
            "attention tensors must be [batch, heads, T, head_dim]; got Q "
            f"{tuple(Q.shape)}, K {tuple(K.shape)}, V {tuple(V.shape)}"
        )
    B, H, Tq, d = Q.shape
    Bk, Hkv, Tk, dk = K.shape
    if V.shape[:3] != K.shape[:3] or Bk != B or dk != d:
        raise ValueError(
            f"incompatible attention shapes: Q {tuple(Q.shape)}, K {tuple(K.shape)}, "
            f"V {tuple(V.shape)}"
        )
    if H % Hkv:
        raise ValueError(f"{H} query heads are not a multiple of {Hkv} key/value heads")
    g = H // Hkv
    dtype = torch.promote_types(Q.dtype, torch.float32)
    mg = None
    if mask is not None:
        if mask.dim() > 4:
            raise ValueError(f"mask must have at most 4 dims, got {tuple(mask.shape)}")
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        if not _broadcasts(mask.shape, (B, H, Tq, Tk)):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not broadcast to "
                f"[batch, heads, T_q, T_k] = {(B, H, Tq, Tk)}"
            )
        if mask.dtype != torch.bool:
            mask = mask.to(dtype)
        mg = _group_heads(mask, H, Hkv, g, "mask")
    sg = None
    if sinks is not None:
        sinks = sinks.reshape(1, -1, 1, 1) if sinks.dim() == 1 else sinks
        if sinks.dim() != 4 or not _broadcasts(sinks.shape, (B, H, Tq, 1)):
            raise ValueError(
                f"sinks of shape {tuple(sinks.shape)}: expected [heads] or a tensor "
                f"broadcastable to [batch, heads, T_q, 1] = {(B, H, Tq, 1)}"
            )
        sg = _group_heads(sinks.to(dtype), H, Hkv, g, "sinks")
    return _Layout(
        B, H, Hkv, g, Tq, Tk, d, V.shape[-1],
        Q.to(dtype).reshape(B, Hkv, g, Tq, d), K.to(dtype).unsqueeze(2),
        V.to(dtype).unsqueeze(2), mg, sg, dtype,
    )


def _rows(t: Tensor | None, i0: int, i1: int) -> Tensor | None:
    """Rows ``i0:i1`` of a broadcastable [..., T_q, x] tensor (kept if broadcast over T_q)."""
    if t is None or t.shape[-2] == 1:
        return t
    return t[..., i0:i1, :]


def _probs(Qc: Tensor, K: Tensor, scale: float, mask: Tensor | None, sinks: Tensor | None,
           softcap: float | None = None):
    """Masked softmax of one query chunk: ``(A, p_sink)``; fully masked rows give A = 0.
    ``softcap`` (Gemma 2): scores become ``tanh(S / softcap)·softcap`` before the mask — an
    element-wise map, through which relevance passes unchanged."""
    S = torch.matmul(Qc * scale, K.transpose(-1, -2))
    E, inv, p_sink = _exp_scores(S, mask, sinks, softcap)
    return E.mul_(inv), p_sink


def _exp_scores(S: Tensor, mask: Tensor | None, sinks: Tensor | None, softcap: float | None,
                span: tuple[int, int] | None = None):
    """:func:`_probs` from the scaled scores ``S`` (overwritten) without the rows'
    normalisation: ``(E, inv, p_sink)`` with ``A = E · inv`` (``inv`` per row, 0 for fully
    masked rows). An additive or boolean mask is applied only on the key columns ``span``
    where it is not open for every row (for a causal mask, the chunk's diagonal block;
    found from the mask if not given)."""
    if softcap is not None:
        S.div_(softcap).tanh_().mul_(softcap)
    a = b = 0
    if mask is not None:
        a, b = _mask_span(mask) if span is None else span
        if a < b:
            Sm, mm = S[..., a:b], mask[..., a:b]
            if mask.dtype == torch.bool:
                Sm.masked_fill_(~mm, float("-inf")) if _same(Sm, mm) else \
                    Sm.copy_(Sm.masked_fill(~mm, float("-inf")))
            else:
                Sm.add_(mm) if _same(Sm, mm) else Sm.copy_(Sm + mm)
    m = S.amax(-1, keepdim=True)
    if sinks is not None:
        m = torch.maximum(m, sinks)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    S.sub_(m)
    E = _exp_spans_(S, a, b)
    Z = E.sum(-1, keepdim=True)
    p_sink = None
    if sinks is not None:
        Es = torch.exp(sinks - m)
        Z = Z + Es
        p_sink = safe_div(Es, Z)
    inv = torch.where(Z > 0, 1.0 / Z, torch.zeros_like(Z))  # fully masked rows: A = 0
    return E, inv, p_sink


def _exp_spans_(S: Tensor, a: int, b: int) -> Tensor:
    """``S.exp_()``, the same values, where only the columns ``[a, b)`` may hold closed
    pairs of a mask (-inf, or an additive mask's ``finfo.min``; the other columns are open
    for every row). There, the entries whose exp underflows to 0 are set to 0 around the
    exp: the vectorised exp takes a slow path for them (30× slower on a causal chunk).
    The comparison and the fills touch those columns only, and the exp runs once over the
    whole block (on a strided slice it is 5× slower than on the contiguous block)."""
    if a >= b:
        return S.exp_()
    X = S[..., a:b]
    dead = X < _dead_below(S.dtype)
    X.masked_fill_(dead, 0.0)
    S.exp_()
    X.masked_fill_(dead, 0.0)
    return S


def _dead_below(dtype: torch.dtype) -> float:
    """Below this, exp underflows to 0 in ``dtype``: ln(smallest subnormal / 2), less one
    for a margin."""
    fi = torch.finfo(dtype)
    return math.log(fi.smallest_normal * fi.eps) - 1.0


def _mask_span(mask: Tensor) -> tuple[int, int]:
    """The key columns ``[a, b)`` outside of which ``mask`` (a chunk's rows) is open for
    every row: True (boolean) or 0 (additive)."""
    closed = ~mask if mask.dtype == torch.bool else mask != 0
    cols = closed.reshape(-1, mask.shape[-1]).any(0).nonzero()
    if cols.numel() == 0:
        return 0, 0
    return int(cols[0]), int(cols[-1]) + 1


def _may_be_zero(Dp: Tensor, nonzero: bool) -> bool:
    """Can an entry of ``Dp = |Q| @ |K|ᵀ (+ |bias|)`` be 0? Not when no entry of ``Q``
    and ``K`` is 0 (``nonzero``, known per call); else one pass over ``Dp`` decides."""
    if Dp.numel() == 0 or nonzero:
        return False
    return not bool(Dp.amin() > 0)


def _same(S: Tensor, t: Tensor) -> bool:
    """Can ``t`` be combined into ``S`` in place (it broadcasts to S's shape and dtype)?"""
    return broadcasts_into(t.shape, S.shape) and (
        t.dtype == torch.bool or torch.result_type(S, t) == S.dtype)


#: An additive mask at or below this closes a pair for sure (exp underflows to 0).
_CLOSED = -1e30


def _key_range(mask: Tensor | None, Tk: int) -> tuple[int, int]:
    """The keys ``[k0, k1)`` that some query of a chunk may attend (``mask``: the chunk's
    rows), or all keys when a row is fully masked (such rows do not give A = 0 under a
    finite additive mask, so their keys must stay)."""
    if mask is None or mask.shape[-1] != Tk:
        return 0, Tk
    open_ = mask if mask.dtype == torch.bool else mask > _CLOSED
    if not bool(open_.any(-1).all()):
        return 0, Tk
    cols = open_.reshape(-1, Tk).any(0).nonzero()
    if cols.numel() == 0:
        return 0, Tk
    return int(cols[0]), int(cols[-1]) + 1


def _has_score_bias(mask: Tensor | None) -> bool:
    """Does an additive mask hold finite non-zero scores (a bias), not only 0 and closed?"""
    if mask is None or mask.dtype == torch.bool:
        return False
    return bool(((mask > _CLOSED) & (mask != 0)).any())


def _bias_magnitude(mask: Tensor | None, scale: float) -> Tensor | None:
    """``|B| / scale`` of the open pairs of an additive mask (closed pairs: 0), in the units
    of ``|Q| @ |K|ᵀ``."""
    if mask is None:
        return None
    return torch.where(mask > _CLOSED, mask, 0.0).abs_().div_(abs(scale))


def _cols(t: Tensor | None, k0: int, k1: int) -> Tensor | None:
    """Key columns ``k0:k1`` of a broadcastable [..., T_k] mask."""
    if t is None or t.shape[-1] == 1:
        return t
    return t[..., k0:k1]


def _live_queries(rels: list[Tensor]) -> Tensor | None:
    """Query positions (dim -2 of [B, Hkv, g, T_q, d_v]) where some relevance arrives, if
    they are at most half of them (e.g. only the last position in an LM's last layer)."""
    Tq = rels[0].shape[-2]
    if Tq < 2:
        return None
    dims = (0, 1, 2, 4)
    live = nonzero_along(rels[0], dims)
    for r in rels[1:]:
        live |= nonzero_along(r, dims)
    idx = live.nonzero().squeeze(-1)
    return idx if idx.numel() * 2 <= Tq else None


def attention_probabilities(
    Q: Tensor,
    K: Tensor,
    *,
    scale: float,
    mask: Tensor | None = None,
    sinks: Tensor | None = None,
) -> Tensor:
    """``A = softmax(Q·Kᵀ·scale + mask)`` as [batch, heads, T_q, T_k] (for tests and
    inspection: this holds the whole T_q × T_k matrix). Same conventions as
    :func:`attention_relevance`; with sinks, rows sum to ``1 - p_sink``."""
    V = K.new_zeros(K.shape[:-1] + (1,))
    lay = _layout(Q, K, V, mask, sinks)
    A, _ = _probs(lay.Q, lay.K, scale, lay.mask, lay.sinks)
    return A.reshape(lay.B, lay.H, lay.Tq, lay.Tk).to(Q.dtype)


def attention_output(
    Q: Tensor,
    K: Tensor,
    V: Tensor,
    *,
    scale: float,
    mask: Tensor | None = None,
    sinks: Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> Tensor:
    """``O = A·V`` per head ([batch, heads, T_q, d_v]), computed in query chunks with the
    same softmax as :func:`attention_relevance` (arguments as there)."""
    lay = _layout(Q, K, V, mask, sinks)
    outs = []
    for i0 in range(0, lay.Tq, chunk):
        i1 = min(lay.Tq, i0 + chunk)
        A, _ = _probs(
            lay.Q[..., i0:i1, :], lay.K, scale, _rows(lay.mask, i0, i1), _rows(lay.sinks, i0, i1)
        )
        outs.append(A @ lay.V)
    O = torch.cat(outs, dim=-2) if outs else lay.Q.new_zeros(lay.B, lay.Hkv, lay.g, 0, lay.dv)
    return O.reshape(lay.B, lay.H, lay.Tq, lay.dv).to(V.dtype)


def attention_relevance(
    R_O: Rel, Q: Tensor, K: Tensor, V: Tensor, *, scale: float, mask: Tensor | None = None,
    sinks: Tensor | None = None, chunk: int = DEFAULT_CHUNK, softcap: float | None = None,
) -> AttentionRelevance:
    """Relevance of ``Q``, ``K``, ``V`` given relevance ``R_O`` of ``O = softmax(Q·Kᵀ·scale +
    mask)·V`` (METHOD.md §4), per head.

    Shapes: ``Q`` [batch, heads, T_q, d]; ``K`` [batch, kv_heads, T_k, d]; ``V`` [batch,
    kv_heads, T_k, d_v]; ``R_O`` like ``O``: [batch, heads, T_q, d_v]. With fewer key/value
    heads than query heads (grouped-query attention), query head ``h`` uses key/value head
    ``h // (heads // kv_heads)`` (the ``repeat_kv`` order of Hugging Face), and ``R_K``,
    ``R_V`` are summed over the repeats. ``Q`` and ``K`` are taken after any rotary embedding.

    ``mask`` broadcastable to [batch, heads, T_q, T_k] (fewer dims are left-padded):
    boolean, ``True`` = the pair takes part (the convention of
    ``F.scaled_dot_product_attention``), or float, added to the scores (``-inf`` masks).
    Masked pairs get probability 0 and no relevance; an additive mask of 0 and closed
    entries takes no share of the scores' relevance, and finite non-zero entries (a score
    bias: T5's relative positions, ALiBi) are a bias of step 3 whose share is absorbed.
    ``sinks``: per-head sink logits (``[heads]`` or
    broadcastable to [batch, heads, T_q, 1]), an extra softmax column with no value (GPT-OSS).
    The sink's probability share ``p_sink`` of each query row keeps that share of the row's
    relevance (absorbed); the rest goes to the real keys.

    Steps, with ``D = A @ |V|`` and ``D' = |Q| @ |K|ᵀ`` (zero denominators give nothing; what
    they would have carried is absorbed): ``R_A = ½·A ⊙ ((R_O/D) @ |V|ᵀ)``, ``R_V = ½·|V| ⊙
    (Aᵀ @ (R_O/D))``, ``R_S = R_A``, ``R_Q = ½·|Q| ⊙ ((R_S/D') @ |K|)``, ``R_K = ½·|K| ⊙
    ((R_S/D')ᵀ @ |Q|)``. ``A`` is recomputed for ``chunk`` queries at a time, so memory peaks
    at batch·heads·chunk·T_k values. ``R_O`` is stacked (``[S, B, H, T_q, dv]``; two
    streams in contrastive mode): each stream is handled separately with the same ``A``.
    Returns ``(R_Q, R_K, R_V, absorbed)``, stacked like ``R_O`` and shaped like ``Q``,
    ``K``, ``V`` (dtype of ``R_O``; ``absorbed`` ``[S]``), with ``R_Q + R_K + R_V +
    absorbed == R_O`` in total (per stream).
    """
    lay = _layout(Q, K, V, mask, sinks)
    q = _Queries.of(lay, R_O)
    acc = _Sums.zeros(lay, q, scale)
    plan = (_Plan.of(q.mask, q.Q.shape[-2], lay.Tk, chunk) if q.rows is not None or mask is None
            else scratch.memo(f"attention.plan.{chunk}.{lay.Tq}.{lay.Tk}", mask,
                              lambda: _Plan.of(q.mask, lay.Tq, lay.Tk, chunk)))
    for span in plan.chunks:
        acc.add_chunk(lay, q, span, scale, softcap, plan.bias)
    return acc.result(lay, q)


class _Span(NamedTuple):
    """One query chunk: queries ``[i0, i1)``, the keys ``[k0, k1)`` they may attend, and
    the columns ``[a, b)`` of those where the mask is not open for every row (relative
    to ``k0``; ``a == b``: the mask adds nothing there)."""

    i0: int
    i1: int
    k0: int
    k1: int
    a: int
    b: int


class _Plan(NamedTuple):
    """The query chunks of one attention call and whether the mask holds a score bias;
    it depends on the mask only, so it is made once per explanation for a mask every
    layer shares (:func:`~dlbhooks.scratch.memo`)."""

    chunks: list[_Span]
    bias: bool

    @classmethod
    def of(cls, mask: Tensor | None, Tq: int, Tk: int, chunk: int) -> _Plan:
        spans = []
        for i0 in range(0, Tq, chunk):
            i1 = min(Tq, i0 + chunk)
            mc = _rows(mask, i0, i1)
            k0, k1 = _key_range(mc, Tk)
            cols = _cols(mc, k0, k1)
            a, b = _mask_span(cols) if cols is not None else (0, 0)
            spans.append(_Span(i0, i1, k0, k1, a, b))
        return cls(spans, _has_score_bias(mask))


@dataclass
class _Queries:
    """The queries :func:`attention_relevance` works on, in the grouped layout: the
    relevance per stream ``R`` ([B, Hkv, g, T, dv]), ``Q``, the mask and sinks rows of the
    queries that receive relevance (``rows``; all of them when ``rows`` is ``None``)."""

    R: list[Tensor]
    Q: Tensor
    mask: Tensor | None
    sinks: Tensor | None
    rows: Tensor | None
    dtype: torch.dtype  # of the relevance (the results')

    @classmethod
    def of(cls, lay: _Layout, R_O: Rel) -> _Queries:
        rels = streams_of(R_O)
        expect = (lay.B, lay.H, lay.Tq, lay.dv)
        for r in rels:
            if tuple(r.shape) != expect:
                raise ValueError(f"R_O has shape {tuple(r.shape)}; expected {expect}")
        Rg = [r.to(lay.dtype).reshape(lay.B, lay.Hkv, lay.g, lay.Tq, lay.dv) for r in rels]
        q = cls(Rg, lay.Q, lay.mask, lay.sinks, _live_queries(Rg), rels[0].dtype)
        if q.rows is not None:  # queries without relevance give nothing: leave them out
            rows = q.rows
            pick = lambda t: t if t is None or t.shape[-2] == 1 else t.index_select(-2, rows)  # noqa: E731
            q.R = [r.index_select(-2, rows) for r in Rg]
            q.Q = q.Q.index_select(-2, rows)
            q.mask, q.sinks = pick(q.mask), pick(q.sinks)
        return q


@dataclass
class _Sums:
    """What :func:`attention_relevance` accumulates per stream over the query chunks:
    ``R_Q`` chunk by chunk, ``R_K`` and ``R_V`` (before their factor ``½·|K|``, ``½·|V|``)
    and the relevance absorbed.

    The products run as batched matrix products over ``N = batch · kv_heads`` with the
    ``g`` query heads of a group stacked on the rows (``[N, g·chunk, ·]``): each key/value
    head is read once per group, and the products into ``R_K`` and ``R_V`` sum over the
    group's heads themselves. The three [rows × keys] temporaries of a chunk are
    :mod:`~dlbhooks.scratch` buffers, reused from chunk to chunk and layer to layer."""

    K: Tensor  # [N, T_k, d]
    absK: Tensor  # [N, T_k, d]
    absV: Tensor  # [N, T_k, dv]
    RQ: Tensor  # [S, B, Hkv, g, T_q (the queries with relevance), d]
    RK: Tensor  # [S, N, T_k, d]
    RV: Tensor  # [S, N, T_k, dv]
    lost: list[Tensor]
    nonzero: bool  # no entry of Q or K is 0 (then no D' = |Q| @ |K|ᵀ is)
    Qs: Tensor  # scale · Q, grouped like q.Q (once per call rather than per chunk)
    absQ: Tensor  # |Q|, likewise

    @classmethod
    def zeros(cls, lay: _Layout, q: _Queries, scale: float) -> _Sums:
        N, n = lay.B * lay.Hkv, len(q.R)
        K = lay.K.reshape(N, lay.Tk, lay.d)
        absK, absQ = K.abs(), q.Q.abs()
        nonzero = not absK.numel() or not absQ.numel() or (
            bool(absK.amin() > 0) and bool(absQ.amin() > 0))
        # (every query row of R_Q is written by its chunk: no clearing; R_K, R_V accumulate)
        return cls(K, absK, lay.V.reshape(N, lay.Tk, lay.dv).abs(), K.new_empty(n, *q.Q.shape),
                   K.new_zeros(n, N, lay.Tk, lay.d), K.new_zeros(n, N, lay.Tk, lay.dv),
                   [K.new_zeros(()) for _ in range(n)], nonzero, q.Q * scale, absQ)

    def add_chunk(self, lay: _Layout, q: _Queries, span: _Span, scale: float,
                  softcap: float | None, bias: bool = False) -> None:
        """Queries ``span.i0:i1``: recompute their ``A`` (over the keys they may attend) and
        add what each stream gives ``Q``, ``K``, ``V`` (the steps of §4). ``bias``: the
        additive mask holds finite non-zero scores (T5's relative position bias, ALiBi):
        they are a bias of step 3, ``D' = |Q| @ |K|ᵀ + |B| / scale``, and keep their share
        (absorbed)."""
        i0, i1, k0, k1 = span.i0, span.i1, span.k0, span.k1
        mc = _cols(_rows(q.mask, i0, i1), k0, k1)
        N, g, c, kc = lay.B * lay.Hkv, lay.g, i1 - i0, k1 - k0
        grid = (lay.B, lay.Hkv, g, c, kc)  # the [rows × keys] blocks, by head

        def block(key: str) -> Tensor:
            return scratch.buffer(f"attention.{key}", (N, g * c, kc), lay.dtype,
                                  lay.K.device, chunked=True)

        Kc, aK, aV = self.K[:, k0:k1], self.absK[:, k0:k1], self.absV[:, k0:k1]
        rows = (N, g * c, lay.d)
        # S becomes E (in place), A = E · inv per row: the rows' normalisation is folded
        # into the small [c, dv] factors instead of a pass over the [c, kc] probabilities
        S = torch.bmm(self.Qs[..., i0:i1, :].reshape(rows), Kc.transpose(1, 2),
                      out=block("scores"))
        _, inv, p_sink = _exp_scores(S.view(grid), mc, _rows(q.sinks, i0, i1), softcap,
                                     span=(span.a, span.b))
        absQc = self.absQ[..., i0:i1, :].reshape(rows)
        D = torch.bmm(S, aV).view(*grid[:4], lay.dv).mul_(inv)  # A @ |V|
        d_positive = D.numel() == 0 or bool(D.amin() > 0)  # (else some relevance is lost)
        Dp = torch.bmm(absQc, aK.transpose(1, 2), out=block("denominators"))  # |Q| @ |K|ᵀ
        Wt, lost_w, bias_w = self._pair_weights(S, Dp, grid, _bias_magnitude(mc, scale)
                                                if bias else None)
        lost = self.lost
        for n, R in enumerate(q.R):
            r = R[..., i0:i1, :]
            if p_sink is not None:
                r_sink = r * p_sink
                r = r - r_sink
                lost[n] = lost[n] + r_sink.sum()
            if d_positive:
                s = r / D
            else:
                s = safe_div(r, D)
                lost[n] = lost[n] + torch.where(D == 0, r, 0.0).sum()
            # s / Z: A ⊙ (s @ |V|ᵀ) = E ⊙ ((s/Z) @ |V|ᵀ), Aᵀ s = Eᵀ (s/Z)
            si = s.mul_(inv).reshape(N, g * c, lay.dv)
            self.RV[n][:, k0:k1] += torch.bmm(S.transpose(1, 2), si)
            P = torch.bmm(si.mul_(0.5), aV.transpose(1, 2), out=block("products"))
            if lost_w is not None:
                lost[n] = lost[n] + (P.view(grid) * lost_w).sum()
            if bias_w is not None:
                lost[n] = lost[n] + (P.view(grid) * bias_w).sum()
            s2 = P.mul_(Wt)  # R_S / D'
            self.RQ[n, ..., i0:i1, :] = torch.bmm(s2, aK).mul_(absQc).view(*grid[:4], lay.d)
            self.RK[n][:, k0:k1] += torch.bmm(s2.transpose(1, 2), absQc)

    def _pair_weights(self, E: Tensor, Dp: Tensor, grid: tuple[int, ...],
                      babs: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """What the queries' and keys' split needs of the exponentials ``E`` for every
        stream at once, ``Wt = E / D'`` (``R_S / D' = (s/Z @ |V|ᵀ) ⊙ E / (2 D')``), in
        place of ``Dp`` (``D'``, to which ``babs``, a score bias's ``|B| / scale``, is added
        first); and the weights of what is absorbed: pairs whose ``D'`` is 0, the bias's
        share (``None`` when there is none)."""
        if babs is not None:
            Dp.view(grid).add_(babs)
        lost_w = bias_w = None
        dp_zero = _may_be_zero(Dp, self.nonzero)
        if dp_zero:
            zero = Dp.view(grid) == 0
            lost_w = torch.where(zero, E.view(grid), 0.0)  # pairs D' cannot take a share of
        Wt = torch.div(E, Dp, out=Dp)
        if dp_zero:
            Wt.view(grid).masked_fill_(zero, 0.0)
        if babs is not None:
            bias_w = Wt.view(grid) * babs  # the bias's share of each pair
        return Wt, lost_w, bias_w

    def result(self, lay: _Layout, q: _Queries) -> AttentionRelevance:
        """``(R_Q, R_K, R_V, absorbed)``, stacked like the relevance and shaped like ``Q``,
        ``K``, ``V`` (the accumulators become the results in place)."""
        n = len(q.R)
        rq = self.RQ.mul_(0.5)
        if q.rows is not None:
            rq = rq.new_zeros(n, *lay.Q.shape).index_copy_(-2, q.rows, rq)
        kv = (n, lay.B, lay.Hkv, lay.Tk)
        rk = self.RK.mul_(self.absK.mul_(0.5)).view(*kv, lay.d)
        rv = self.RV.mul_(self.absV.mul_(0.5)).view(*kv, lay.dv)
        return AttentionRelevance(rq.view(n, lay.B, lay.H, lay.Tq, lay.d).to(q.dtype),
                                  rk.to(q.dtype), rv.to(q.dtype),
                                  torch.stack(self.lost).to(q.dtype))


# -- nn.MultiheadAttention --------------------------------------------------------------------


def _float_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """MultiheadAttention masks: boolean ``True`` = ignore -> ``-inf``; float masks as given."""
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise UnsupportedModuleError(f"attention masks must be bool or float, got {mask.dtype}")
    return mask.to(dtype)


@dataclass
class _MHACall:
    """One ``nn.MultiheadAttention`` call rebuilt from its record: everything in [N, L, E]
    layout, heads split as [N, H, T, head_dim]."""

    rec: Record
    batched: bool
    batch_first: bool
    N: int
    L: int
    S: int  # source length, without the add_bias_kv row
    E: int
    H: int
    hd: int
    query: Tensor
    key: Tensor
    value: Tensor
    weights: dict[str, Tensor | None]
    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None
    sinks: Tensor | None
    extra_kv: bool

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.hd)

    def to_nle(self, t: Tensor) -> Tensor:
        if not self.batched:
            return t.unsqueeze(0)
        return t if self.batch_first else t.transpose(0, 1)

    def from_nle(self, t: Tensor) -> Tensor:
        if not self.batched:
            return t.squeeze(0)
        return t if self.batch_first else t.transpose(0, 1)

    def split_heads(self, t: Tensor) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], self.H, self.hd).transpose(1, 2)

    def merge_heads(self, t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], self.E)

    def attention(self) -> Tensor:
        """Concatenated head outputs [N, L, E] (the out_proj input)."""
        O = attention_output(self.q, self.k, self.v, scale=self.scale, mask=self.mask,
                             sinks=self.sinks)
        return self.merge_heads(O)


def _check_mha(rec: Record) -> None:
    m = rec.module
    if m.training and m.dropout > 0:
        raise UnsupportedModuleError(
            f"{rec.describe()} ran in training mode with attention dropout {m.dropout}: the "
            "dropped attention weights cannot be recomputed. Call model.eval() before tracing."
        )
    if any(t.is_nested for t in rec.inputs):
        raise UnsupportedModuleError(
            f"{rec.describe()} was called with nested tensors, which dlbhooks does not "
            "support; pass padded tensors with a key_padding_mask instead."
        )
    if rec.outputs and rec.outputs[0].is_nested:
        raise UnsupportedModuleError(f"{rec.describe()} returned a nested tensor (unsupported)")


def _mha_call(rec: Record, param: Callable[[nn.Module, str], Tensor | None]) -> _MHACall:
    _check_mha(rec)
    m = rec.module
    query, key, value = _mha_inputs(rec)
    E, H = m.embed_dim, m.num_heads
    call = _MHACall(
        rec=rec, batched=query.dim() == 3, batch_first=bool(m.batch_first), N=0, L=0, S=0,
        E=E, H=H, hd=E // H, query=query, key=key, value=value, weights=_mha_weights(m, param),
        q=query, k=key, v=value, mask=None, sinks=None, extra_kv=False,
    )
    query, key, value = call.to_nle(query), call.to_nle(key), call.to_nle(value)
    N = query.shape[0]
    call.N, call.L, call.S = N, query.shape[1], key.shape[1]
    call.query, call.key, call.value = query, key, value
    w = call.weights
    q = F.linear(query, w["q"], w["bq"])
    k = F.linear(key, w["k"], w["bk"])
    v = F.linear(value, w["v"], w["bv"])
    bias_k, bias_v = param(m, "bias_k"), param(m, "bias_v")
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.reshape(1, 1, E).expand(N, 1, E).to(k.dtype)], dim=1)
        v = torch.cat([v, bias_v.reshape(1, 1, E).expand(N, 1, E).to(v.dtype)], dim=1)
        call.extra_kv = True
    call.q, call.k, call.v = call.split_heads(q), call.split_heads(k), call.split_heads(v)
    call.mask, call.sinks = _mha_mask(call, rec.arguments, bool(m.add_zero_attn), q)
    return call


def _mha_inputs(rec: Record) -> tuple[Tensor, Tensor, Tensor]:
    """The call's query, key and value tensors (as the module saw them)."""
    idx = {name: i for i, name in enumerate(rec.input_names)}
    for name in ("query", "key", "value"):
        if name not in idx:
            raise UnsupportedModuleError(
                f"{rec.describe()}: could not find the {name!r} tensor among the call's "
                f"arguments {rec.input_names}"
            )
    q, k, v = (rec.input_value(idx[n]) for n in ("query", "key", "value"))
    return q, k, v


def _mha_weights(m: nn.Module, param) -> dict[str, Tensor | None]:
    """The projections' weights and biases: ``q``, ``k``, ``v``, ``o`` and ``b*``."""
    b_in = param(m, "in_proj_bias")
    bq, bk, bv = b_in.chunk(3) if b_in is not None else (None, None, None)
    if m._qkv_same_embed_dim:
        Wq, Wk, Wv = param(m, "in_proj_weight").chunk(3)
    else:
        Wq, Wk, Wv = (param(m, f"{x}_proj_weight") for x in "qkv")
    return {"q": Wq, "k": Wk, "v": Wv, "bq": bq, "bk": bk, "bv": bv,
            "o": param(m.out_proj, "weight"), "bo": param(m.out_proj, "bias")}


def _mha_mask(call: _MHACall, args: dict, zero_attn: bool,
              q: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The additive (or boolean) mask over [N, H, L, keys] and the sinks (the
    ``add_zero_attn`` column) the attention ran with; ``q``: the projected queries."""
    L, S, N, H = call.L, call.S, call.N, call.H
    sinks = None
    attn_mask, kpm = args.get("attn_mask"), args.get("key_padding_mask")
    if args.get("is_causal", False) and kpm is None and not args.get("need_weights", True):
        # F.multi_head_attention_forward then drops attn_mask and runs SDPA with
        # is_causal=True: a top-left causal mask over every key column, extra ones included
        n_cols = S + call.extra_kv + zero_attn
        causal = torch.ones(L, n_cols, dtype=torch.bool, device=q.device).tril()
        mask = causal[:, : S + call.extra_kv].reshape(1, 1, L, -1)
        if zero_attn:
            sinks = q.new_zeros(L).masked_fill(~causal[:, -1], float("-inf"))
            sinks = sinks.reshape(1, 1, L, 1)
        return mask, sinks
    mask = None
    if isinstance(attn_mask, Tensor):
        am = _float_mask(attn_mask, q.dtype)
        mask = am.reshape(1, 1, L, S) if am.dim() == 2 else am.reshape(N, H, L, S)
    if isinstance(kpm, Tensor):
        kp = _float_mask(kpm, q.dtype).reshape(N, 1, 1, S)
        mask = kp if mask is None else mask + kp
    if mask is not None and call.extra_kv:
        mask = F.pad(mask, (0, 1))
    if zero_attn:
        # a zero key and value: a column with logit exactly 0 and no value, i.e. a sink
        sinks = q.new_zeros(1, 1, 1, 1)
    return mask, sinks


def mha_recompute(
    rec: Record, param: Callable[[nn.Module, str], Tensor | None] = fetch_param
) -> Tensor:
    """The attention output of a recorded ``nn.MultiheadAttention`` call, recomputed the way
    the rule sees it (in the call's layout). For checking the rule against the module."""
    call = _mha_call(rec, param)
    w = call.weights
    return call.from_nle(F.linear(call.attention(), w["o"], w["bo"]))


@register_rule(nn.MultiheadAttention, name="multihead_attention")
def multihead_attention_rule(rec: Record, R_out: list[Tensor | None],
                             ctx: RuleContext) -> RuleResult:
    """``nn.MultiheadAttention``: out_proj (§2) -> per-head attention (§4) -> q/k/v
    projections (§2). Q, K, V are recomputed from the recorded query/key/value inputs.

    Biases of the projections, ``add_bias_kv``'s extra key/value and the ``add_zero_attn``
    column (treated as an attention sink) are absorbed; the attention-weights output gets
    no relevance (any relevance put on it is absorbed). Masks get none.
    """
    call = _mha_call(rec, ctx.param)
    w = call.weights
    R_y = rmap(call.to_nle, R_out[0])
    R_cat, absorbed = weighted_sum(
        R_y, call.attention(), w["o"], w["bo"], linear_fwd, linear_adj,
        bounds=ctx.bounds_after(rec),
    )
    R_O = rmap(call.split_heads, R_cat)
    R_q, R_k, R_v, ab = attention_relevance(
        R_O, call.q, call.k, call.v, scale=call.scale, mask=call.mask, sinks=call.sinks
    )
    absorbed = radd(absorbed, ab)
    if call.extra_kv:
        S = call.S
        absorbed = radd(absorbed, rmap(lambda a, b: a[:, :, S:].sum() + b[:, :, S:].sum(),
                                       R_k, R_v))
        R_k, R_v = rmap(lambda r: r[:, :, :S], R_k), rmap(lambda r: r[:, :, :S], R_v)
    R_in = {}
    for name, R, x in (("query", R_q, call.query), ("key", R_k, call.key),
                       ("value", R_v, call.value)):
        R_x, ab = weighted_sum(
            rmap(call.merge_heads, R), x, w[name[0]], w["b" + name[0]], linear_fwd, linear_adj
        )
        absorbed = radd(absorbed, ab)
        R_in[name] = rmap(call.from_nle, R_x)
    for R in R_out[1:]:  # attention weights: no relevance goes through them
        if R is not None:
            absorbed = radd(absorbed, rmap(lambda t: t.sum(), R))
    return RuleResult([R_in.get(name) for name in rec.input_names], absorbed)
