"""Composite rules as data: the functional maths inside a module's ``forward``.

Hooks see module calls, not ``a + b``, ``act(gate) * up`` or ``torch.tanh(x)`` written in
a ``forward``. A :class:`Functional` composite describes those operations with *locators*
(which recorded tensor: a child's output, a child's input, the module's own argument) and
*ops* (:class:`Add`, :class:`Mul`, :class:`Unary`, :class:`Gather`, :class:`Rope`), e.g. a
pre-norm decoder layer::

    Functional(
        Add(Ret(0), (In("post_attention_layernorm"), Out("mlp"))),
        Add(In("post_attention_layernorm"), (Arg(0), Out("self_attn"))),
    )

The composite walks the module's children in reverse call order and runs each op as soon
as every consumer of its result has been processed, so relevance meets each op complete.
The rules of the ops are those of METHOD.md §3: the add rule (∝ |a|), the product rule
(half to each factor), element-wise pass-through, and the §2 rule on RoPE's 2×2 rotation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import DLBError, UnsupportedModuleError
from ..relevance import CURRENT_STREAMS, Rel, by_target, radd, rmap, rsum, stack
from ..storage import check_tolerance
from .arith import nonneg_div, reduce_stacked
from .composite import add_split, first_stream, per_stream
from .contract import Bag, RuleContext, RuleResult
from .core import contrastive_side_coefficients, contrastive_split
from .elementwise import product_rule

if TYPE_CHECKING:
    from ..records import Record


@dataclass
class Located:
    """A tensor found by a locator: ``tensor`` is the object relevance is keyed by (a view
    of ``base`` when ``base`` is set), ``value`` its values as the forward saw them."""

    tensor: Any
    value: Tensor | None
    base: Tensor | None = None


class Loc:
    """Where a tensor is, relative to a module's record."""

    def find(self, rec: Record, tmp: dict) -> Located | None:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class _ChildLoc(Loc):
    """Tensor ``i`` of the ``call``-th call of the direct child ``name``."""

    name: str
    i: int = 0
    call: int = 0

    def find(self, rec, tmp):
        c = rec.child(self.name, self.call, direct=True)
        return None if c is None else self.pick(c)

    def pick(self, c: Record) -> Located | None:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Out(_ChildLoc):
    """Output ``i`` of the ``call``-th call of child ``name``."""

    def pick(self, c):
        if len(c.outputs) <= self.i:
            return None
        return Located(c.outputs[self.i], c.output_value(self.i))


@dataclass(frozen=True)
class In(_ChildLoc):
    """Input ``i`` of the ``call``-th call of child ``name``."""

    def pick(self, c):
        if len(c.inputs) <= self.i:
            return None
        return Located(c.inputs[self.i], c.inputs[self.i])


@dataclass(frozen=True)
class Arg(Loc):
    """The module's own input: by position among its tensor inputs, or by argument name."""

    key: int | str = 0

    def find(self, rec, tmp):
        if isinstance(self.key, str):
            hits = [i for i, n in enumerate(rec.input_names)
                    if n == self.key or n.startswith(self.key + ".")]
            if not hits:
                return None
            if len(hits) > 1:  # a tuple argument: hand back the whole tuple
                return Located(tuple(rec.inputs[i] for i in hits), None)
            i = hits[0]
        else:
            i = self.key
            if i >= len(rec.inputs):
                return None
        return Located(rec.inputs[i], rec.input_value(i))


@dataclass(frozen=True)
class Ret(Loc):
    """The module's own output: by position among its tensor outputs, or by name."""

    key: int | str = 0

    def find(self, rec, tmp):
        names = rec.output_names
        i = names.index(self.key) if isinstance(self.key, str) and self.key in names else self.key
        if not isinstance(i, int) or i >= len(rec.outputs):
            return None
        return Located(rec.outputs[i], rec.outputs[i])


@dataclass(frozen=True)
class Tmp(Loc):
    """An intermediate result no module consumed (e.g. the first of two embedding adds)."""

    name: str

    def find(self, rec, tmp):
        return tmp.setdefault(self.name, Located(_Placeholder(self.name), None))


@dataclass(frozen=True)
class First(Loc):
    """The first of several locators that finds something (e.g. input ids or embeds)."""

    options: tuple[Loc, ...]

    def find(self, rec, tmp):
        for o in self.options:
            hit = o.find(rec, tmp)
            if hit is not None:
                return hit
        return None


@dataclass(frozen=True)
class Opt(Loc):
    """A term that may be absent (e.g. token-type embeddings when none were passed)."""

    loc: Loc

    def find(self, rec, tmp):
        return self.loc.find(rec, tmp)


@dataclass(frozen=True)
class Heads(Loc):
    """``src`` ([b, s, width] or [b, s, h, d]) split into heads shaped like ``like``
    ([b, heads, s, d]): ``src[..., off:off + heads·d].view(b, s, heads, d).transpose(1, 2)``
    — a view of ``src``. ``off`` is the width of the ``after`` tensors (fused projections:
    keys come after the queries in ``qkv_proj``)."""

    src: Loc
    like: Loc
    after: tuple[Loc, ...] = ()

    def find(self, rec, tmp):
        src, like = self.src.find(rec, tmp), self.like.find(rec, tmp)
        if src is None or like is None:
            return None
        b, h, s, d = like.value.shape
        off = 0
        for loc in self.after:
            t = loc.find(rec, tmp).value
            off += t.shape[1] * t.shape[3]

        def cut(t: Tensor) -> Tensor:
            t = t.reshape(t.shape[0], t.shape[1], -1) if t.dim() == 4 else t
            return t[..., off:off + h * d].view(b, s, h, d).transpose(1, 2)

        return Located(cut(src.tensor), cut(src.value), src.tensor)


@dataclass(frozen=True)
class Chunk(Loc):
    """``src.chunk(n, dim)[index]`` (a view)."""

    src: Loc
    n: int
    index: int
    dim: int = -1

    def find(self, rec, tmp):
        src = self.src.find(rec, tmp)
        if src is None:
            return None
        return Located(src.tensor.chunk(self.n, self.dim)[self.index],
                       src.value.chunk(self.n, self.dim)[self.index], src.tensor)


class _Placeholder:
    """Stands for an intermediate tensor in the bag (keyed by identity)."""

    def __init__(self, name: str):
        self.name = name


# -- ops ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    result: Loc

    def operands(self) -> tuple[Loc, ...]:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Add(Op):
    """``result = Σ terms`` (add rule). Terms listed in ``absorb`` (e.g. position embeddings,
    constants) keep their share: it is absorbed and reported under ``names``."""

    terms: tuple[Loc, ...] = ()
    absorb: tuple[int, ...] = ()
    names: tuple[str, ...] | None = None

    def operands(self):
        return self.terms


@dataclass(frozen=True)
class Mul(Op):
    """``result = Π factors`` of activations (product rule: equal shares)."""

    factors: tuple[Loc, ...] = ()

    def operands(self):
        return self.factors


@dataclass(frozen=True)
class Unary(Op):
    """``result = f(operand)`` element-wise (tanh, GELU, soft-capping, scaling): relevance
    passes through."""

    operand: Loc = None

    def operands(self):
        return (self.operand,)


@dataclass(frozen=True)
class Gather(Op):
    """``result[b] = source[b, t_b]`` along ``dim`` (e.g. the last non-pad token's logits):
    ``t_b`` is found by exact match of the recorded values."""

    source: Loc = None
    dim: int = 1

    def operands(self):
        return (self.source,)


@dataclass(frozen=True)
class Rope(Op):
    """``result = x·cos + rotate_half(x)·sin`` on the first ``cos.shape[-1]`` dims of
    ``operand`` (the rest passes): the §2 rule on each output's two contributions."""

    operand: Loc = None
    cos_sin: Loc = field(default_factory=lambda: Arg("position_embeddings"))
    half_cos: bool = False  # cos/sin hold one value per pair (GPT-OSS): repeat them

    def operands(self):
        return (self.operand,)


# -- the composite ------------------------------------------------------------------------


class Functional:
    """A composite rule built from ops; register it for a module type (see module doc)."""

    def __init__(self, *ops: Op, name: str = "functional"):
        self.ops = ops
        self.__name__ = name

    def __call__(self, rec: Record, R_out: list[Tensor | None],
                 ctx: RuleContext) -> RuleResult:
        tmp: dict = {}
        bag = ctx.seed_outputs(rec, R_out)
        plan = self._plan(rec, tmp)
        absorbed = None
        for child in reversed(rec.children):
            while plan and plan[0][0] > child.index:
                absorbed = radd(absorbed, self._run(plan.pop(0)[1], rec, bag, tmp, ctx))
            ctx.step(child, bag)
        for _, op in plan:
            absorbed = radd(absorbed, self._run(op, rec, bag, tmp, ctx))
        return RuleResult(ctx.collect(rec, bag), absorbed)

    def _plan(self, rec: Record, tmp: dict) -> list[tuple[float, Op]]:
        """Ops with the call index before which each must run (its result's first consumer)."""
        for op in reversed(self.ops):  # forward order: give intermediates their values
            if isinstance(op.result, Tmp) and isinstance(op, (Add, Mul)):
                vals = [f.value for f in (o.find(rec, tmp) for o in op.operands()) if f is not None]
                if vals:
                    total = vals[0]
                    for v in vals[1:]:
                        total = total + v if isinstance(op, Add) else total * v
                    op.result.find(rec, tmp).value = total
        plan = []
        when_of: dict[int, float] = {}  # id(placeholder) -> when of the op that reads it
        for order, op in enumerate(self.ops):
            res = op.result.find(rec, tmp)
            if res is None:
                continue
            if isinstance(op.result, Tmp):
                when = when_of.get(id(res.tensor), math.inf)
            else:
                users = [c.index for c in rec.children if any(t is res.tensor for t in c.inputs)]
                when = min(users) if users else math.inf
            for o in op.operands():
                if isinstance(o, Tmp):
                    when_of[id(o.find(rec, tmp).tensor)] = when
            plan.append((when, order, op))
        # Tmp results run right after the op that consumes them: keep list order on ties
        plan.sort(key=lambda p: (-p[0], p[1]))
        return [(w, op) for w, _, op in plan]

    def _run(self, op: Op, rec: Record, bag: Bag, tmp: dict,
             ctx: RuleContext) -> Rel | None:
        res = op.result.find(rec, tmp)
        R = bag.pop(res.tensor)
        if R is None:
            return None
        found = [o.find(rec, tmp) for o in op.operands()]
        keep = [not (f is None and isinstance(o, Opt)) for o, f in zip(op.operands(), found)]
        if isinstance(op, Add) and not all(keep):
            names = op.names
            op = Add(op.result, tuple(o for o, k in zip(op.operands(), keep) if k),
                     tuple(i for i in op.absorb if keep[i]),
                     None if names is None else tuple(n for n, k in zip(names, keep) if k))
            found = [f for f, k in zip(found, keep) if k]
        if any(f is None for f in found):
            missing = [str(o) for o, f in zip(op.operands(), found) if f is None]
            raise UnsupportedModuleError(
                f"composite rule for {rec.describe()}: could not find {missing} among the "
                "recorded calls; the model's forward differs from what the rule expects"
            )
        if isinstance(op, Add):
            return self._add(op, rec, R, found, bag, ctx)
        if isinstance(op, Mul):
            values = [f.value for f in found]
            if res.value is not None and not isinstance(op.result, Tmp) \
                    and not _combine_matches(values, res.value, torch.mul):
                raise DLBError(
                    f"composite rule for {rec.describe()}: the factors {list(op.factors)} do not "
                    "multiply to the recorded result; the model's forward differs from the "
                    "rule's spec"
                )
            if R.shape[0] == 1:
                parts = per_stream(lambda r: product_rule(r, values), R)
            else:  # several stack entries: the same share, computed once
                share = R / len(values)
                parts = [reduce_stacked(share, v.shape) for v in values]
            for f, part in zip(found, parts):
                bag.add(f.tensor, part, rec, base=f.base)
            return None
        if isinstance(op, Unary):
            f = found[0]
            if f.tensor is res.tensor:
                bag.add(f.tensor, R, rec, base=f.base)
                return None
            bag.add(f.tensor, rmap(lambda r: r.reshape(f.value.shape), R), rec, base=f.base)
            return None
        if isinstance(op, Gather):
            return self._gather(op, rec, R, res, found[0], bag)
        if isinstance(op, Rope):
            return self._rope(op, rec, R, res, found[0], bag, tmp)
        raise TypeError(op)

    def _add(self, op: Add, rec: Record, R: Rel, found: list, bag: Bag,
             ctx: RuleContext) -> Rel | None:
        values = [f.value for f in found]
        shape = torch.broadcast_shapes(*(v.shape for v in values))
        if R_shape(R) != shape and math.prod(R_shape(R)) == math.prod(shape):
            R = rmap(lambda r: r.reshape(shape), R)  # ``(a + b).reshape(...)`` returned
        res = op.result.find(rec, {}) if not isinstance(op.result, Tmp) else None
        if res is not None and res.value is not None:
            if not _combine_matches(values, res.value, torch.add):
                raise DLBError(
                    f"composite rule for {rec.describe()}: the terms {list(op.terms)} do not add "
                    "up to the recorded result; the model's forward differs from the rule's spec"
                )
        parts, absorbed = add_split(R, values)
        for n, (f, part) in enumerate(zip(found, parts)):
            if op.names is not None:
                ctx.report_block(rec.key, op.names[n], part)
            if n in op.absorb:
                absorbed = radd(absorbed, rmap(lambda t: t.sum(), part))
            else:
                bag.add(f.tensor, part, rec, base=f.base)
        return absorbed

    def _gather(self, op: Gather, rec, R, res: Located, src: Located, bag):
        out, full = res.value, src.value
        dim = op.dim
        nd = full.dim()
        d = dim % nd if -nd <= dim < nd else 0  # along a dim after the batch's
        fits = d != 0 and tuple(out.shape) == tuple(full.shape[:d] + full.shape[d + 1:])
        moved = full.movedim(dim, 1) if fits else None  # [b, s, ...]
        match = (moved == out.unsqueeze(1)).flatten(2).all(-1) if fits else None  # [b, s]
        if not fits or not bool(match.any(-1).all()):
            raise DLBError(
                f"{rec.describe()}: the returned {tuple(out.shape)} tensor is not a slice of "
                f"{tuple(full.shape)} along dim {dim}; the Gather spec does not fit this model"
            )
        pos = torch.arange(match.shape[1], device=match.device)
        idx = torch.where(match, pos, -1).amax(-1)  # the last matching position per row

        def place(r: Tensor) -> Tensor:
            z = r.new_zeros(moved.shape)
            z[torch.arange(z.shape[0], device=z.device), idx] = r
            return z.movedim(1, dim)

        bag.add(src.tensor, rmap(place, R), rec, base=src.base)
        return None

    def _rope(self, op: Rope, rec, R, res: Located, x: Located, bag, tmp):
        cs = op.cos_sin.find(rec, tmp)
        cos, sin = cs.tensor if isinstance(cs.tensor, tuple) else (None, None)
        if cos is None:
            raise UnsupportedModuleError(f"{rec.describe()}: no rotary (cos, sin) recorded")
        xv = x.value
        if op.half_cos:
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        rot = cos.shape[-1]
        c = cos.unsqueeze(1).to(xv.dtype) if cos.dim() == 3 else cos.to(xv.dtype)
        s = sin.unsqueeze(1).to(xv.dtype) if sin.dim() == 3 else sin.to(xv.dtype)
        xr = xv[..., :rot]
        half = rot // 2
        got = res.value
        try:  # cos/sin wider than the heads, or for other positions: not this model's RoPE
            fits = rot % 2 == 0 and rot <= xv.shape[-1] and tuple(torch.broadcast_shapes(
                xr.shape, c.shape, s.shape)) == tuple(xr.shape)
        except RuntimeError:
            fits = False
        if not fits:
            raise DLBError(
                f"{rec.describe()}: rotary cos/sin of shape {tuple(c.shape)} do not fit the "
                f"recorded {tuple(xv.shape)} query/key source: the family spec is wrong"
            )
        rows = _sample_rows(got)  # the spec check, on a few positions
        sub = (lambda t: t) if rows is None else (  # noqa: E731
            lambda t: t if t.shape[-2] == 1 else t.index_select(-2, rows))
        xs, cs_, ss_ = sub(xv), sub(c), sub(s)
        xsr = xs[..., :rot]
        rotated = torch.cat((-xsr[..., half:], xsr[..., :half]), dim=-1)
        expect = torch.cat((xsr * cs_ + rotated * ss_, xs[..., rot:]), dim=-1)
        if expect.shape != sub(got).shape or not close_to_recorded(expect, sub(got)):
            raise DLBError(
                f"{rec.describe()}: re-applying RoPE to the recorded {x.tensor.shape} source "
                "does not give the attention's query/key: the family spec is wrong"
            )
        R_rot, absorbed = rope_relevance(rmap(lambda r: r[..., :rot], R), xr, c, s)
        R_x = R_rot if rot == x.value.shape[-1] else rmap(
            lambda r_rot, r: torch.cat((r_rot, r[..., rot:]), dim=-1), R_rot, R)
        bag.add(x.tensor, R_x, rec, base=x.base)
        return absorbed


def rope_relevance(R: Rel, x: Tensor, c: Tensor, s: Tensor) -> tuple[Rel, Tensor]:
    """The RoPE rule: output ``j`` of ``x·c + rotate_half(x)·s`` is ``A_j + B_j``; its
    relevance splits by §2 (no bias) over its two contributions, and ``B_j``'s share goes
    to the partner ``x_{j ± half}``. ``x`` and ``R`` are the rotated dims only; ``c``/``s``
    broadcast to ``x``. ``R`` is stacked: one stream is split by default mode, two by
    contrastive mode (several targets: each target's streams, by the explanation's mode).
    Returns (relevance on ``x``, absorbed per stream)."""
    m = CURRENT_STREAMS.get() or R.shape[0]
    half = x.shape[-1] // 2
    if m > 1 and R.shape[0] > m:  # several targets in contrastive mode: each target's pair
        parts = [rope_relevance(Rt, x, c, s) for Rt in by_target(R, m)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if m == 1:  # default mode: one split for every target
        absA = torch.mul(x, c).abs_()
        absB = torch.empty_like(absA)
        torch.mul(x[..., half:], s[..., :half], out=absB[..., :half])
        torch.mul(x[..., :half], s[..., half:], out=absB[..., half:])
        absB.abs_()
        T = absA + absB
        zero = None if T.numel() == 0 or float(T.amin()) > 0 else T == 0
        one = R.shape[0] == 1  # one target: in place on its own temporaries
        q = nonneg_div(R[0] if one else R, T, own=True, positive=zero is None)
        rA, rB = (absA.mul_(q), absB.mul_(q)) if one else (q * absA, q.mul_(absB))
        rA[..., :half].add_(rB[..., half:])
        rA[..., half:].add_(rB[..., :half])
        absorbed = R.new_zeros(R.shape[0]) if zero is None else rsum(torch.where(zero, R, 0.0))
        return (rA.unsqueeze(0) if one else rA), absorbed
    A = x * c
    B = torch.cat((-x[..., half:], x[..., :half]), dim=-1) * s
    # each unit's two contributions by sign: P and N summed directly (from |A| + |B| and
    # A + B, a small side, |B| << |A| where sin is small, would not conserve its stream)
    Ap, An = A.clamp_min(0.0), A.clamp_max(0.0).neg_()
    Bp, Bn = B.clamp_min(0.0), B.clamp_max(0.0).neg_()
    split = contrastive_split(Ap + Bp, An + Bn, A + B, None)
    pairs, absorbed = contrastive_side_coefficients(R, split)
    outs = []
    for cp, cn in pairs:
        rA, rB = cp * Ap + cn * An, cp * Bp + cn * Bn
        outs.append(rA + torch.cat((rB[..., half:], rB[..., :half]), dim=-1))
    return stack(outs), absorbed


def _sample_rows(t: Tensor | None, n: int = 4) -> Tensor | None:
    """A few positions along dim -2 of a large tensor (first, last and between), for
    sanity checks that need not look at every value; ``None``: check everything."""
    if t is None or t.dim() < 2 or t.numel() <= 16384 or t.shape[-2] <= n:
        return None
    return _spread(t.shape[-2], n, t.device)


@functools.lru_cache(maxsize=64)
def _spread(L: int, n: int, device: torch.device) -> Tensor:
    """``n`` distinct positions in ``[0, L)``, first and last included, evenly spread
    (kept: every check of an explanation asks for the same few)."""
    return torch.linspace(0, L - 1, n, device=device).round().long().unique()


def _combine_matches(values: list[Tensor], recorded: Tensor, op) -> bool:
    """Do the terms combined by ``op`` (``torch.add``, ``torch.mul``) give the recorded
    result? (On a few positions when large.)"""
    try:
        shape = torch.broadcast_shapes(*(v.shape for v in values))
    except RuntimeError:
        return False
    if math.prod(shape) != recorded.numel():
        return False
    rows = _sample_rows(recorded) if tuple(shape) == tuple(recorded.shape) else None
    if rows is not None:
        values = [v if v.dim() < 2 or v.shape[-2] == 1 else v.index_select(-2, rows)
                  for v in values]
        recorded = recorded.index_select(-2, rows)
    total = values[0]
    for v in values[1:]:
        total = op(total, v)
    return close_to_recorded(total.reshape(recorded.shape), recorded)


def R_shape(R: Rel) -> tuple:
    return tuple(first_stream(R).shape)


def close_to_recorded(computed: Tensor, recorded: Tensor) -> bool:
    """Sanity check of a spec: recomputed values match the recorded ones (loose tolerance:
    the forward may have run in low precision)."""
    if computed.dtype == recorded.dtype and torch.equal(computed, recorded):
        return True  # (the usual case, in one pass)
    scale = float(recorded.detach().abs().max().clamp_min(1))
    tol = check_tolerance()  # looser when records were stored in low precision
    return torch.allclose(computed.to(recorded.dtype), recorded, rtol=tol, atol=tol * scale)
