"""The rule contract: what a rule receives, what it may use, what it returns.

A rule is a function ``rule(record, relevance_out, ctx) -> RuleResult``:

* ``record`` — the :class:`~dlbhooks.records.Record` of one module call (its inputs,
  outputs, children);
* ``relevance_out`` — one entry per ``record.outputs``: a tensor ``[S, *output.shape]``
  whose leading axis stacks what is explained at once, ``S = targets × streams``
  (target-major; one stream per target in default mode, two in contrastive mode, positive
  first: ``S = 1`` or ``2`` for one target), or ``None``;
* ``ctx`` — a :class:`RuleContext`: the only way a rule reads weights, walks children or
  reports per-head, per-expert or per-block quantities.

It returns a :class:`RuleResult`: the relevance per ``record.inputs`` (same stacking,
``None`` for inputs that get none, such as masks) and what the rule absorbed (per stream:
a tensor ``[S]``, or ``[S, ...]`` that the engine sums per stream; ``None`` for nothing).

A rule that treats every stream alike and never mixes them can be written for one tensor
without the leading axis and registered with ``streamwise=True``: the engine calls it once
per stream and stacks the results. A rule written for one target's streams (``S = 1`` or
``2``: e.g. one that splits a contrastive pair itself) is wrapped with :func:`per_target`.

Rules written to the first documented form — returning a list, or ``(list, absorbed)``, of
tensors without the leading axis (:class:`~dlbhooks.relevance.Streams` pairs in
contrastive mode) — still run, through :func:`legacy_call`, with a ``DeprecationWarning``
at registration. A rule is taken to be in the new form when its return annotation is
``RuleResult`` (or it is marked with :func:`stacked_rule`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ..relevance import Rel, Streams, rsum, stack, total64

if TYPE_CHECKING:
    from ..records import Record
    from .registry import Rule

__all__ = ["Bag", "RuleContext", "RuleResult", "is_stacked_form", "legacy_call",
           "per_target", "stacked_rule", "streamwise_call"]


class RuleResult(NamedTuple):
    """What a rule returns: relevance per input (``[S, *input.shape]`` or ``None``) and
    what it absorbed (per stream, ``[S]`` or ``[S, ...]``; ``None`` for nothing)."""

    relevance_in: list[Tensor | None]
    absorbed: Tensor | None = None


@runtime_checkable
class Bag(Protocol):
    """Relevance waiting at tensors, keyed by identity (composite rules walk with it)."""

    def add(self, t: Tensor, R: Rel, by: Record | None = None, *,
            base: Tensor | None = None) -> None: ...

    def pop(self, t: Tensor) -> Rel | None: ...

    def peek(self, t: Tensor) -> Rel | None: ...

    def leftovers(self) -> Iterator[tuple[Tensor, Rel, Record | None]]: ...


class RuleContext(Protocol):
    """What a rule may use of the engine running it."""

    mode: str
    saturation: bool

    @property
    def contrastive(self) -> bool:
        """Contrastive mode (``S = 2``: positive, negative)?"""
        ...

    @property
    def streams(self) -> int:
        """Streams per target: 1 (default mode) or 2 (contrastive)."""
        ...

    targets: int  # targets explained in this pass (``S = targets × streams``)

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype stored records are computed in (a storage policy's), or ``None``."""
        ...

    # weights
    def param(self, module: nn.Module, name: str) -> Tensor | None: ...

    def abs_param(self, module: nn.Module, name: str,
                  transient: bool = False) -> Tensor | None:
        """``|module.<name>|``; ``transient``: valid only until the next transient
        ``|W|`` is asked for (it may live in a reused scratch buffer)."""
        ...

    def abs_bias(self, module: nn.Module,
                 name: str = "bias") -> tuple[Tensor | None, bool | None]: ...

    # forward facts
    def shared(self, rec: Record) -> dict | None: ...

    def nonnegative_input(self, rec: Record, i: int = 0) -> bool: ...

    def bounds_after(self, rec: Record) -> tuple[Any, Any] | None: ...

    def lookup(self, module_type: type) -> Rule | None: ...

    # walking a composite's children
    def new_bag(self, owner: Record | None = None) -> Bag: ...

    def seed_outputs(self, rec: Record, R_out: list[Rel | None], *,
                     keep_inputs: bool = True) -> Bag: ...

    def walk(self, records: list[Record], bag: Bag) -> Bag: ...

    def step(self, rec: Record, bag: Bag) -> None: ...

    def collect(self, rec: Record, bag: Bag) -> list[Rel | None]: ...

    # reports (summed over calls; see Explanation.blocks/heads/experts/routing)
    def report_block(self, key: str, name: str, value: Rel) -> None: ...

    def report_heads(self, key: str, value: Rel) -> None: ...

    def report_experts(self, key: str, value: Rel) -> None: ...

    def pop_experts(self, key: str) -> Rel | None: ...

    def report_routing(self, key: str, indices: Tensor, weights: Tensor) -> None: ...


RuleFn = Callable[["Record", list[Tensor | None], RuleContext], RuleResult]


def stacked_rule(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``fn`` as written to the contract (for functions without a return
    annotation, e.g. lambdas)."""
    fn.__dlb_stacked__ = True  # type: ignore[attr-defined]
    return fn


def is_stacked_form(fn: Callable[..., Any]) -> bool:
    """Is ``fn`` written to the contract: marked, or annotated ``-> RuleResult``?"""
    target = fn
    while hasattr(target, "func"):  # functools.partial
        target = target.func
    if getattr(target, "__dlb_stacked__", False) or getattr(fn, "__dlb_stacked__", False):
        return True
    if not callable(target):
        return False
    call = target if inspect.isfunction(target) or inspect.ismethod(target) else type(
        target).__call__
    ann = getattr(call, "__annotations__", {}).get("return")
    if ann is RuleResult:
        return True
    return isinstance(ann, str) and ann.split(".")[-1] == "RuleResult"


def per_target(fn: Callable[..., RuleResult]) -> Callable[..., RuleResult]:
    """A rule written for one target's streams (``S`` = 1 or 2) made a rule for any number
    of targets: called once per target, the results concatenated. For leaf rules only (a
    rule that walks children or reports would mix the per-target calls' totals)."""

    @functools.wraps(fn)
    def rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
        k = getattr(ctx, "targets", 1)
        if k == 1:
            return fn(rec, R_out, ctx)
        m = ctx.streams
        outs = [fn(rec, [None if r is None else r[t * m:(t + 1) * m] for r in R_out], ctx)
                for t in range(k)]
        R_in: list[Tensor | None] = []
        for parts in zip(*(o.relevance_in for o in outs)):
            like = next((p for p in parts if p is not None), None)
            R_in.append(None if like is None else torch.cat(
                [like.new_zeros(like.shape) if p is None else p for p in parts]))
        if all(o.absorbed is None for o in outs):
            return RuleResult(R_in)
        zero = torch.zeros(m, dtype=torch.float64)
        return RuleResult(R_in, torch.cat([zero.to(_device(R_out)) if o.absorbed is None
                                           else rsum(o.absorbed) for o in outs]))

    rule.__dlb_stacked__ = True  # type: ignore[attr-defined]
    return rule


def _device(R_out: list[Tensor | None]) -> torch.device:
    return next(r.device for r in R_out if r is not None)


def streamwise_call(fn: Callable[..., Any], rec: Record, R_out: list[Rel | None],
                    ctx: RuleContext) -> RuleResult:
    """Run ``fn``, written for one stream's tensors (no leading axis), once per stream;
    its results (a :class:`RuleResult`, a list, or ``(list, absorbed)``) stacked."""
    S = next(r.shape[0] for r in R_out if r is not None)
    outs = [_as_result(fn(rec, [None if r is None else r[s] for r in R_out], ctx))
            for s in range(S)]
    R_in = [None if parts[0] is None else stack(parts)
            for parts in zip(*(o.relevance_in for o in outs))]
    if outs[0].absorbed is None:
        return RuleResult(R_in)
    return RuleResult(R_in, torch.stack([_total(o.absorbed) for o in outs]))


def legacy_call(fn: Callable[..., Any], rec: Record, R_out: list[Rel | None],
                ctx: RuleContext) -> RuleResult:
    """Run a rule of the first form, not streamwise: tensors without the leading axis in
    default mode, :class:`Streams` pairs in contrastive mode, and a context whose bags
    take and give relevance in that form; results stacked."""
    old = _LegacyContext(ctx)
    res = _as_result(fn(rec, old.legacy_list(R_out), old))
    R_in = old.stacked_list(res.relevance_in)
    a = res.absorbed
    if a is None:
        return RuleResult(R_in)
    if ctx.contrastive:
        return RuleResult(R_in, torch.stack([_total(a[0]), _total(a[1])]))
    return RuleResult(R_in, _total(a).reshape(1))


class _LegacyBag:
    """A bag for rules of the first form: relevance in and out without the leading axis
    (:class:`Streams` in contrastive mode)."""

    def __init__(self, bag: Bag, ctx: _LegacyContext):
        self.bag, self._ctx = bag, ctx

    def add(self, t: Tensor, R: Any, by: Record | None = None, *,
            base: Tensor | None = None) -> None:
        self.bag.add(t, self._ctx.stacked(R), by, base=base)

    def pop(self, t: Tensor) -> Any:
        return self._ctx.legacy(self.bag.pop(t))

    def peek(self, t: Tensor) -> Any:
        return self._ctx.legacy(self.bag.peek(t))


class _LegacyContext:
    """The engine as rules of the first form saw it: everything passes through, except
    that relevance crosses bags and collect() in that form."""

    def __init__(self, ctx: RuleContext):
        self._ctx = ctx

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)

    def stacked(self, R: Any) -> Rel | None:
        if R is None:
            return None
        if isinstance(R, Streams):
            return stack((R.pos, R.neg))
        if self._ctx.contrastive:
            raise TypeError("a rule of the first form gave one tensor in contrastive mode; "
                            "give Streams(pos, neg) or write the rule to the RuleResult form")
        return R.unsqueeze(0)

    def legacy(self, R: Rel | None) -> Any:
        if R is None:
            return None
        return Streams(R[0], R[1]) if self._ctx.contrastive else R[0]

    def stacked_list(self, rels: list[Any]) -> list[Rel | None]:
        return [self.stacked(r) for r in rels]

    def legacy_list(self, rels: list[Rel | None]) -> list[Any]:
        return [self.legacy(r) for r in rels]

    def _inner(self, bag: Any) -> Bag:
        return bag.bag if isinstance(bag, _LegacyBag) else bag

    def new_bag(self, owner: Record | None = None) -> _LegacyBag:
        return _LegacyBag(self._ctx.new_bag(owner), self)

    def seed_outputs(self, rec: Record, R_out: list[Any], *,
                     keep_inputs: bool = True) -> _LegacyBag:
        bag = self._ctx.seed_outputs(rec, self.stacked_list(R_out), keep_inputs=keep_inputs)
        return _LegacyBag(bag, self)

    def walk(self, records: list[Record], bag: Any) -> Any:
        self._ctx.walk(records, self._inner(bag))
        return bag

    def step(self, rec: Record, bag: Any) -> None:
        self._ctx.step(rec, self._inner(bag))

    def collect(self, rec: Record, bag: Any) -> list[Any]:
        return self.legacy_list(self._ctx.collect(rec, self._inner(bag)))


def _as_result(res: Any) -> RuleResult:
    if isinstance(res, RuleResult):
        return res
    if isinstance(res, tuple) and len(res) == 2 and isinstance(res[0], list):
        return RuleResult(res[0], res[1])
    return RuleResult(list(res))


def _total(t: Tensor | float) -> Tensor:
    if not isinstance(t, Tensor):
        return torch.tensor(float(t), dtype=torch.float64)
    return total64(t)
