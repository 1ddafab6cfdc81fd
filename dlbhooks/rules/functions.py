"""Rules for torch functions called in a ``forward`` (METHOD.md §7).

While tracing, the torch functions a module without a rule calls in its ``forward`` (``a +
b``, ``torch.cat``, ``F.interpolate``, ``x.mean(-1)``) are recorded as records of their
own (:class:`FunctionCall` stands for the module), next to the module records and in call
order, so the engine walks them like any child. Functions called inside a module that has
a rule are not recorded: its rule covers them.

Each function gets the rule of the operation it performs — the §2–§4 rules, never a new
one — registered per function with :func:`register_function_rule`:

* element-wise maps of one activation (activations, casts, ``neg``, ``exp``, ``rsqrt``):
  relevance passes through (:func:`passthrough_call`);
* routing (``cat``, ``stack``, indexing that copies, ``gather``, ``where``, ``pad``,
  ``reshape`` that copies, ``repeat``, ``flip``, ``roll``): relevance moves with the values,
  exactly, through the function's adjoint; what lands on constants (a pad value) is
  absorbed (:func:`routing_call`);
* ``add``/``sub``: the add rule ∝ |term|; a term not derived from the forward's inputs (a
  parameter, a constant, a number) keeps its share, absorbed (:func:`add_call`);
* ``mul``/``div``: to the activation when the other factor is a constant, a parameter or a
  statistic of the same input (computed from it by functions only: ``x * rsqrt(mean(x²))``,
  ``x / x.sum()``); the product rule (half each) for two activations (:func:`mul_call`);
* fixed linear maps with non-negative weights (``sum``, ``mean``, ``avg_pool``,
  ``interpolate`` nearest/linear/bilinear/trilinear/area): §2 with the implicit weights,
  computed with the map and its adjoint (:func:`linear_map_call`);
* ``matmul`` of two activations: the pairwise product rule (§4); with a parameter, and
  ``F.linear``: §2 (:func:`matmul_call`, :func:`linear_call`);
* ``max``/``amax`` over a dimension: the winner takes it, ties split (:func:`max_call`).

A recorded function without a rule that relevance reaches raises
:class:`~dlbhooks.errors.FunctionalGapError` naming the function, the module and the source
line that called it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import FunctionalGapError
from ..relevance import Rel, radd, rsum
from .arith import nonneg_div, reduce_stacked
from .attention import attention_relevance
from .composite import LINEAR, MATMUL, add_split
from .contract import RuleContext, RuleResult
from .core import weighted_sum
from .norm import affine_split
from .pooling import adaptive_tables, pool_relevance, regular_tables
from .registry import register_rule

if TYPE_CHECKING:
    from ..records import Record

FunctionRule = Callable[["Record", list["Tensor | None"], RuleContext], RuleResult]


@dataclass(eq=False)
class FunctionCall:
    """The "module" of a recorded function call: the function, its arguments as called,
    where in the source it was called, and the values of arguments it changed in place
    (``before``: argument index -> value before the call)."""

    func: Callable[..., Any]
    name: str
    args: tuple
    kwargs: dict
    where: str
    derived: frozenset[int] = frozenset()  # indices (in rec.inputs) of derived tensors
    before: dict[int, Tensor] = field(default_factory=dict)

    @property
    def type_name(self) -> str:
        return self.name


_FUNCTION_RULES: dict[Any, FunctionRule] = {}


def register_function_rule(*funcs: Any, rule: FunctionRule | None = None):
    """Register ``rule`` for torch functions (``torch.add``, ``torch.Tensor.__add__``,
    ``torch.nn.functional.interpolate``, ...); usable as a decorator. The rule follows the
    contract of :mod:`dlbhooks.rules.contract`; ``record.module`` is the
    :class:`FunctionCall` (``func``, ``args``, ``kwargs``)."""

    def deco(f: FunctionRule) -> FunctionRule:
        for fn in funcs:
            _FUNCTION_RULES[fn] = f
        return f

    return deco(rule) if rule is not None else deco


def function_rule(func: Any) -> FunctionRule | None:
    """The rule registered for ``func``, if any."""
    return _FUNCTION_RULES.get(func)


def function_call_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """Dispatch a recorded function call to the rule registered for its function."""
    call: FunctionCall = rec.module
    rule = _FUNCTION_RULES.get(call.func)
    if rule is None:
        owner = rec.parent.describe() if rec.parent is not None else "the model"
        raise FunctionalGapError(
            f"relevance reached the result of {call.name} (torch function "
            f"{_qualified(call.func)}) called in {owner}.forward at {call.where}; dlbhooks "
            "has no rule for it. Register one with "
            f"@dlb.register_function_rule({_qualified(call.func)}), or a composite rule for "
            "the module with @dlb.register_rule (README, 'Custom rules').")
    return rule(rec, R_out, ctx)


register_rule(FunctionCall, function_call_rule, name="function")


def _qualified(func: Any) -> str:
    """The public name of a torch function: ``torch.cumsum``, ``torch.Tensor.__add__``."""
    name = getattr(func, "__name__", None) or repr(func)
    for owner, prefix in ((torch, "torch"), (F, "torch.nn.functional"),
                          (torch.Tensor, "torch.Tensor")):
        if getattr(owner, name, None) is func:
            return f"{prefix}.{name}"
    mod = getattr(func, "__module__", None)
    return f"{mod}.{name}" if mod else name


# -- helpers ----------------------------------------------------------------------------------


def _call(rec: Record) -> FunctionCall:
    return rec.module


def _derived_inputs(rec: Record) -> list[int]:
    return sorted(_call(rec).derived)


def _value(rec: Record, i: int) -> Tensor:
    """Input ``i`` as the function saw it (its value before an in-place change)."""
    before = _call(rec).before
    return before[i] if i in before else rec.inputs[i]


def _out(R_out: list[Tensor | None]) -> Tensor:
    R = R_out[0]
    if R is None:
        raise FunctionalGapError("a function rule was called without relevance on its output")
    return R


def _substitute(rec: Record, values: dict[int, Tensor]) -> tuple[tuple, dict]:
    """The call's arguments with input ``i`` replaced by ``values[i]``."""
    by_id = {id(rec.inputs[i]): v for i, v in values.items()}
    call = _call(rec)

    def sub(obj: Any) -> Any:
        if isinstance(obj, Tensor):
            return by_id.get(id(obj), obj)
        if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
            return type(obj)(sub(o) for o in obj)
        return obj

    return sub(call.args), {k: sub(v) for k, v in call.kwargs.items()}


def _result(rec: Record, parts: dict[int, Rel | None], absorbed: Tensor | None) -> RuleResult:
    return RuleResult([parts.get(i) for i in range(len(rec.inputs))], absorbed)


def _first_derived(rec: Record) -> int:
    d = _derived_inputs(rec)
    if not d:
        raise FunctionalGapError(f"{rec.describe()}: no input derived from the forward's inputs")
    return d[0]


# -- element-wise and routing -----------------------------------------------------------------


def passthrough_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """An element-wise map of one activation: its relevance passes through."""
    R, i = _out(R_out), _first_derived(rec)
    x = rec.inputs[i]
    if R.shape[1:] != x.shape:
        R = R.reshape(R.shape[0], *x.shape)
    if x.is_floating_point() and _call(rec).name in _CASTS and \
            torch.finfo(x.dtype).eps < torch.finfo(R.dtype).eps:
        R = R.to(x.dtype)  # relevance regains the input's precision (a float64 model whose
        # logits are cast to float32); it never loses its own
    return _result(rec, {i: R}, None)


_CASTS = {"float", "double", "half", "bfloat16", "to", "type_as", "type"}


def routing_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """Functions that move values (``cat``, indexing, ``where``, ``pad``, ...): relevance goes
    back with them through the function's adjoint (a copy is summed where a value was used
    twice); relevance on positions holding constants is absorbed."""
    derived = _derived_inputs(rec)
    call = _call(rec)
    outs = [k for k, o in enumerate(rec.outputs) if o.is_floating_point()]
    Rs = [R_out[k] for k in outs]
    ref = next(r for r in Rs if r is not None)
    # moved in the relevance's dtype (a float32 op must not round float64 relevance)
    xs = [_value(rec, i).to(ref.dtype) for i in derived]

    def f(*ts: Tensor) -> tuple[Tensor, ...]:
        args, kwargs = _substitute(rec, dict(zip(derived, ts)))
        res = call.func(*args, **kwargs)
        return tuple(_float_leaves(res))

    outs_now, pull = torch.func.vjp(f, *xs)[:2]
    S = ref.shape[0]
    parts: dict[int, list[Tensor]] = {i: [] for i in derived}
    for s in range(S):
        cot = tuple((r[s] if r is not None else torch.zeros_like(o)).to(o.dtype)
                    for r, o in zip(Rs, outs_now))
        for i, g in zip(derived, pull(cot)):
            parts[i].append(g)
    R_in = {i: torch.stack(p).to(ref.dtype) for i, p in parts.items()}
    absorbed = None
    constants = any(t.is_floating_point() and k not in call.derived
                    for k, t in enumerate(rec.inputs))
    if constants or call.func in _MAY_HOLD_CONSTANTS:  # relevance on constant positions
        absorbed = _on_constants(f, xs, Rs)
    return _result(rec, dict(R_in), absorbed)


def _on_constants(f: Callable[..., tuple[Tensor, ...]], xs: list[Tensor],
                  Rs: list[Tensor | None]) -> Tensor:
    """Per stream, the relevance on output positions that hold constants (a pad value,
    a filled mask, the constant branch of ``where``): those that do not change when the
    derived inputs do."""
    ones = f(*(torch.ones_like(x) for x in xs))
    twos = f(*(torch.full_like(x, 2.0) for x in xs))
    lost = None
    for r, o1, o2 in zip(Rs, ones, twos):
        if r is not None:
            lost = radd(lost, rsum(torch.where(o1 == o2, r, 0.0)))
    assert lost is not None
    return lost


def _float_leaves(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _float_leaves(o)]
    return []


# -- add, mul, div ------------------------------------------------------------------------------


def _terms(rec: Record) -> list[tuple[int | None, Tensor]]:
    """The operands of a binary call as ``(input index or None, value)``: ``None`` for
    numbers and tensors not derived from the forward's inputs (they are constants)."""
    call = _call(rec)
    operands = list(call.args[:2])
    if len(operands) < 2 and "other" in call.kwargs:
        operands.append(call.kwargs["other"])
    out = []
    for op in operands:
        idx = next((i for i, t in enumerate(rec.inputs) if t is op), None)
        if idx is not None and idx in call.derived:
            out.append((idx, _value(rec, idx)))
        else:
            ref = rec.outputs[0]
            out.append((None, op if isinstance(op, Tensor) else torch.tensor(
                op, dtype=ref.dtype, device=ref.device)))
    return out


def add_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``a + b``, ``a - b`` (and ``alpha``): the add rule ∝ |term|; constants keep their
    share (absorbed)."""
    R = _out(R_out)
    terms = _terms(rec)
    alpha = _call(rec).kwargs.get("alpha")
    values = [v for _, v in terms]
    if alpha is not None:
        values[1] = values[1] * alpha
    if R.shape[1:] != rec.outputs[0].shape:
        R = R.reshape(R.shape[0], *rec.outputs[0].shape)
    parts, lost = add_split(R, [v.to(R.dtype) for v in values])
    absorbed = lost
    out: dict[int, Rel | None] = {}
    for (idx, _), part in zip(terms, parts):
        if idx is None:
            absorbed = radd(absorbed, rsum(part))
        else:
            out[idx] = radd(out.get(idx), part)
    return _result(rec, out, rsum(absorbed))


def mul_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``a * b`` and ``a / b``: all to the activation when the other operand is a constant,
    a parameter or a statistic of it; half each for two activations (``a / b`` with ``b``
    an activation that is no statistic of ``a`` has no rule)."""
    R = _out(R_out)
    (ia, a), (ib, b) = _terms(rec)
    div = _call(rec).name in _DIVISIONS
    live = [(i, v) for i, v in ((ia, a), (ib, b)) if i is not None]
    if len(live) == 2:
        if _statistic_of(rec, ib, ia):
            live = [(ia, a)]
        elif _statistic_of(rec, ia, ib) and not div:
            live = [(ib, b)]
        elif div:
            raise FunctionalGapError(
                f"{rec.describe()} divides by an activation that is not a statistic of the "
                f"numerator (called at {_call(rec).where}); METHOD.md §7 has no rule for it. "
                "Register a composite rule for the module.")
    share = R / len(live)
    out: dict[int, Rel | None] = {}
    for i, v in live:
        out[i] = radd(out.get(i), reduce_stacked(share, v.shape))
    return _result(rec, out, None)


_DIVISIONS = {"div", "truediv", "true_divide", "div_", "itruediv", "rtruediv"}


def _statistic_of(rec: Record, stat: int | None, of: int | None) -> bool:
    """Was input ``stat`` computed from input ``of`` by recorded functions only (no module
    in between): a norm's ``rsqrt(mean(x²))``, a softmax's ``sum(exp(x))``?"""
    if stat is None or of is None:
        return False
    parent = rec.parent
    if parent is None:
        return False
    # by tensor ids: the calls after this one (already walked) may have been released
    ids = rec.input_ids()
    target = ids[of]
    seen: set[int] = set()
    frontier = [ids[stat]]
    producers = {o: c for c in parent.children if isinstance(c.module, FunctionCall)
                 for o in c.output_ids()}
    while frontier:
        t = frontier.pop()
        if t == target:
            return True
        if t in seen:
            continue
        seen.add(t)
        producer = producers.get(t)
        if producer is None:
            continue
        frontier.extend(producer.input_ids()[i] for i in producer.module.derived)
    return False


# -- linear maps ------------------------------------------------------------------------------


def linear_map_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """A fixed linear map with non-negative weights of one activation (``sum``, ``mean``,
    ``avg_pool``, ``interpolate`` nearest/linear/area): §2 with its implicit weights,
    computed by applying the map and its adjoint."""
    R, i = _out(R_out), _first_derived(rec)
    call = _call(rec)
    mode = call.kwargs.get("mode", call.args[3] if call.name == "interpolate"
                           and len(call.args) > 3 else "nearest")
    if call.name == "interpolate" and mode in ("bicubic",):
        raise FunctionalGapError(
            f"{rec.describe()}: interpolate(mode='bicubic') has negative taps; dlbhooks has "
            f"no rule for it yet (called at {call.where}).")

    def fmap(x: Tensor, w: Tensor) -> Tensor:
        args, kwargs = _substitute(rec, {i: x})
        return call.func(*args, **kwargs) * w

    a = _value(rec, i).to(R.dtype)  # (in the relevance's dtype: float32 islands too)
    one = torch.ones((), dtype=a.dtype, device=a.device)
    R_x, absorbed = weighted_sum(R.reshape(R.shape[0], *rec.outputs[0].shape), a, one, None,
                                 fmap, None, contrastive=ctx.contrastive)
    return _result(rec, {i: R_x}, absorbed)


def matmul_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``a @ b``: of two activations, each summed pair gets its share ∝ |a_ik b_kj|, half to
    each factor (§4); with a parameter or constant ``b``: §2 (``x @ W``)."""
    R = _out(R_out)
    (ia, a), (ib, b) = ((i, v.to(R.dtype)) for i, v in _terms(rec))
    out, absorbed = _matmul_parts(rec, R, ia, a, ib, b, ctx)
    return _result(rec, out, absorbed)


def _matmul_parts(rec: Record, R: Tensor, ia: int | None, a: Tensor, ib: int | None,
                  b: Tensor, ctx: RuleContext) -> tuple[dict[int, Rel | None], Tensor | None]:
    """Relevance of the factors of ``a @ b`` (input indices ``ia``, ``ib``; ``None`` for a
    constant) from ``R`` on the product, and what was absorbed."""
    if ia is not None and ib is None:
        fwd, adj = MATMUL if b.dim() == 2 else (_matmul, None)  # batched: adjoint by vjp
        R_a, absorbed = weighted_sum(R, a, b, None, fwd, adj, contrastive=ctx.contrastive)
        return {ia: R_a}, absorbed
    if ia is None and ib is not None:  # constant @ activation: (bᵀ aᵀ)ᵀ
        R_b, absorbed = weighted_sum(R, b, a, None, _rmatmul, None, contrastive=ctx.contrastive)
        return {ib: R_b}, absorbed
    if ia is None or ib is None or a.dim() < 2 or b.dim() < 2:
        raise FunctionalGapError(
            f"{rec.describe()}: matmul of two constants or of vectors has no rule yet "
            f"(called at {_call(rec).where}).")
    A, B = a.abs(), b.abs()
    D = A @ B

    def parts(r: Tensor) -> tuple[Tensor, Tensor]:
        q = nonneg_div(r, D)
        return (A * (q @ B.transpose(-1, -2))) * 0.5, (B * (A.transpose(-1, -2) @ q)) * 0.5

    pieces = [parts(r) for r in R.unbind(0)]
    ra = reduce_stacked(torch.stack([p[0] for p in pieces]), a.shape)
    rb = reduce_stacked(torch.stack([p[1] for p in pieces]), b.shape)
    lost = rsum(torch.where(D == 0, R, 0.0))  # units without contributions
    if ia == ib:
        return {ia: ra + rb}, lost
    return {ia: ra, ib: rb}, lost


def baddbmm_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``baddbmm(input, b1, b2, beta, alpha) = beta·input + alpha·(b1 @ b2)`` (ALiBi
    scores): ``beta·input`` is a bias of the pairwise products (METHOD §4, step 3): each
    score's relevance splits ∝ ``|alpha·b1_ik b2_kj|`` over the pairs (half to each
    factor) and ``|beta·input|``, whose share is absorbed when it is a constant."""
    call = _call(rec)
    R = _out(R_out)
    ops = [_arg(call, k, n) for k, n in enumerate(("input", "batch1", "batch2"))]
    beta, alpha = call.kwargs.get("beta", 1.0), call.kwargs.get("alpha", 1.0)
    idx = [next((i for i, t in enumerate(rec.inputs) if t is op), None) for op in ops]
    idx = [i if i is not None and i in call.derived else None for i in idx]
    bias, b1, b2 = ((_value(rec, i) if i is not None else op).to(R.dtype)
                    for i, op in zip(idx, ops))
    if idx[1] is None or idx[2] is None:
        raise FunctionalGapError(f"{rec.describe()}: baddbmm with a constant factor has no "
                                 f"rule yet (called at {call.where}).")
    A, B, Bias = b1.abs() * abs(alpha), b2.abs(), (bias * beta).abs()
    D = A @ B + Bias
    ra, rb, rbias = [], [], []
    for r in R.unbind(0):
        q = nonneg_div(r, D)
        ra.append(A * (q @ B.transpose(-1, -2)) * 0.5)
        rb.append(B * (A.transpose(-1, -2) @ q) * 0.5)
        rbias.append(q * Bias)
    out: dict[int, Rel | None] = {idx[1]: torch.stack(ra)}
    out[idx[2]] = radd(out.get(idx[2]), torch.stack(rb))
    R_bias = torch.stack(rbias)
    absorbed = rsum(torch.where(D == 0, R, 0.0))
    if idx[0] is None:
        absorbed = radd(absorbed, rsum(R_bias))
    else:
        out[idx[0]] = radd(out.get(idx[0]), reduce_stacked(R_bias, bias.shape))
    return _result(rec, out, absorbed)


def index_add_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``self.index_add(dim, index, source, alpha)``: at each position, the add rule over
    the value there and every source row added to it; constants keep their share."""
    call = _call(rec)
    R = _out(R_out)
    dim, index = _arg(call, 1, "dim"), _arg(call, 2, "index")
    src_op, self_op = _arg(call, 3, "source"), call.args[0]
    alpha = call.kwargs.get("alpha", 1.0)
    i_self = next((i for i, t in enumerate(rec.inputs) if t is self_op), None)
    i_src = next((i for i, t in enumerate(rec.inputs) if t is src_op), None)
    base = (_value(rec, i_self) if i_self is not None else self_op).to(R.dtype)
    src = (_value(rec, i_src) if i_src is not None else src_op).to(R.dtype) * alpha
    mag_self, mag_src = base.abs(), src.abs()
    D = mag_self.index_add(dim, index, mag_src)
    out: dict[int, Rel | None] = {}
    r_self, r_src = [], []
    for r in R.unbind(0):
        q = nonneg_div(r, D)
        r_self.append(mag_self * q)
        r_src.append(mag_src * q.index_select(dim, index))
    Rs, Rsrc = torch.stack(r_self), torch.stack(r_src)
    absorbed = rsum(torch.where(D == 0, R, 0.0))
    for i, part in ((i_self, Rs), (i_src, Rsrc)):
        if i is not None and i in call.derived:
            out[i] = radd(out.get(i), part)
        else:
            absorbed = radd(absorbed, rsum(part))
    return _result(rec, out, absorbed)


def einsum_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``torch.einsum`` of two operands: of two activations, the pairwise product rule
    (each summed pair ∝ its |product|, half to each factor, as ``matmul``); with one
    constant operand, §2 with it as the weights."""
    call = _call(rec)
    eq = call.args[0]
    ops = list(call.args[1]) if len(call.args) == 2 and isinstance(call.args[1], (list, tuple)) \
        else list(call.args[1:])
    if len(ops) != 2:
        raise FunctionalGapError(f"{rec.describe()}: einsum of {len(ops)} operands has no "
                                 f"rule yet (called at {call.where}).")
    idx = [next((i for i, t in enumerate(rec.inputs) if t is op), None) for op in ops]
    live = [i is not None and i in call.derived for i in idx]
    R = _out(R_out)
    a, b = ((_value(rec, i) if i is not None else op).to(R.dtype) for i, op in zip(idx, ops))
    if live[0] != live[1]:
        k = 0 if live[0] else 1
        x, w = (a, b) if k == 0 else (b, a)

        def fwd(t: Tensor, c: Tensor) -> Tensor:
            return torch.einsum(eq, t, c) if k == 0 else torch.einsum(eq, c, t)

        R_x, absorbed = weighted_sum(R, x, w.to(x.dtype), None, fwd, None,
                                     contrastive=ctx.contrastive)
        return _result(rec, {idx[k]: R_x}, absorbed)
    if not any(live):
        return _result(rec, {}, rsum(R))
    A, B = a.abs(), b.abs()
    D, pull = torch.func.vjp(lambda x, y: torch.einsum(eq, x, y), A, B)[:2]
    ra, rb = [], []
    for r in R.unbind(0):
        ga, gb = pull(nonneg_div(r, D))
        ra.append(A * ga * 0.5)
        rb.append(B * gb * 0.5)
    Ra, Rb = torch.stack(ra), torch.stack(rb)
    lost = rsum(R) - rsum(Ra) - rsum(Rb)  # outputs with D = 0 (no contribution)
    out: dict[int, Rel | None] = {}
    for i, r in zip(idx, (Ra, Rb)):
        out[i] = radd(out.get(i), r)
    return _result(rec, out, lost)


def _matmul(x: Tensor, w: Tensor) -> Tensor:
    return x @ w


def _rmatmul(x: Tensor, w: Tensor) -> Tensor:
    return w @ x


def linear_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``F.linear(x, W, b)``: §2, as ``nn.Linear``."""
    call = _call(rec)
    x_i = _first_derived(rec)
    W = call.args[1] if len(call.args) > 1 else call.kwargs["weight"]
    b = call.args[2] if len(call.args) > 2 else call.kwargs.get("bias")
    x = _value(rec, x_i)
    R_x, absorbed = weighted_sum(_out(R_out), x, W.to(x.dtype), None if b is None else
                                 b.to(x.dtype), *LINEAR, contrastive=ctx.contrastive)
    return _result(rec, {x_i: R_x}, absorbed)


def max_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``max``/``amax`` over a dimension (or all): the winner takes the relevance, ties
    split."""
    R, i = _out(R_out), _first_derived(rec)
    call = _call(rec)
    x = _value(rec, i)
    dim = call.kwargs.get("dim", call.args[1] if len(call.args) > 1 else None)
    keep = call.kwargs.get("keepdim", call.args[2] if len(call.args) > 2 else False)
    if isinstance(dim, Tensor):
        raise FunctionalGapError(
            f"{rec.describe()}: the element-wise maximum of two tensors has no rule yet "
            f"(called at {call.where}).")
    values = rec.outputs[0]
    if dim is None:
        win = (x == values).to(R.dtype)
        share = win / win.sum()
        R_x = R.reshape(R.shape[0], *([1] * x.dim())) * share
        return _result(rec, {i: R_x}, None)
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    v, r = values, R
    if not keep:
        for d in sorted(d % x.dim() for d in dims):
            v = v.unsqueeze(d)
            r = r.unsqueeze(d + 1)
    win = (x == v).to(R.dtype)
    share = win / win.sum(dim=dims, keepdim=True)
    return _result(rec, {i: r * share}, None)


# -- functional forms of module rules ---------------------------------------------------------


def _arg(call: FunctionCall, i: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of the call (position ``i`` or keyword)."""
    if len(call.args) > i:
        return call.args[i]
    return call.kwargs.get(name, default)


def layer_norm_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``F.layer_norm`` / ``F.group_norm``: statistics are constants, the affine part is §2
    element-wise with β's share absorbed (as ``nn.LayerNorm``, ``nn.GroupNorm``)."""
    call = _call(rec)
    R, i = _out(R_out), _first_derived(rec)
    x = _value(rec, i)
    group = call.name == "group_norm"
    shape_or_groups = _arg(call, 1, "num_groups" if group else "normalized_shape")
    w, b = _arg(call, 2, "weight"), _arg(call, 3, "bias")
    eps = _arg(call, 4, "eps", 1e-5)
    if group:
        xhat = F.group_norm(x, shape_or_groups, None, None, eps)
        view = (1, -1, *([1] * (x.dim() - 2)))
        w = None if w is None else w.view(view)
        b = None if b is None else b.view(view)
    else:
        xhat = F.layer_norm(x, shape_or_groups, None, None, eps)
    scaled = xhat * w if w is not None else xhat
    parts = [affine_split(r, scaled, b, positive=None) for r in R.unbind(0)]
    R_x = torch.stack([p[0] for p in parts])
    absorbed = torch.stack([p[1].double() for p in parts])
    return _result(rec, {i: R_x}, absorbed)


def conv_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``F.conv1d/2d/3d(x, W, b, ...)``: §2, as the ``nn.Conv`` modules."""
    call = _call(rec)
    i = _first_derived(rec)
    x = _value(rec, i)
    W, b = _arg(call, 1, "weight"), _arg(call, 2, "bias")
    rest = call.args[3:]
    kw = {k: v for k, v in call.kwargs.items() if k not in ("input", "weight", "bias")}

    def fwd(t: Tensor, w: Tensor) -> Tensor:
        return call.func(t, w, None, *rest, **kw)

    bias = None if b is None else b.view(1, -1, *([1] * (x.dim() - 2)))
    R_x, absorbed = weighted_sum(_out(R_out), x, W, bias, fwd, None,
                                 contrastive=ctx.contrastive)
    return _result(rec, {i: R_x}, absorbed)


def embedding_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``F.embedding(ids, W)``: a token's relevance is the sum over its vector."""
    call = _call(rec)
    ids = _arg(call, 0, "input")
    idx = next((k for k, t in enumerate(rec.inputs) if t is ids), None)
    R = _out(R_out)
    return _result(rec, {} if idx is None else {idx: R.sum(-1)}, None)


def sdpa_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``F.scaled_dot_product_attention``: the attention rule (§4) on its Q, K, V, with its
    mask (boolean or additive), ``is_causal`` and ``scale``."""
    call = _call(rec)
    q, k, v = (_arg(call, n, name) for n, name in enumerate(("query", "key", "value")))
    mask = _arg(call, 3, "attn_mask")
    causal = bool(_arg(call, 5, "is_causal", False))
    scale = _arg(call, 6, "scale")
    if float(_arg(call, 4, "dropout_p", 0.0) or 0.0) > 0.0:
        raise FunctionalGapError(f"{rec.describe()}: attention dropout is active; explain "
                                 "the model in eval mode (dropout_p=0).")
    if _arg(call, 7, "enable_gqa", False) is False and q.shape[-3] != k.shape[-3]:
        raise FunctionalGapError(f"{rec.describe()}: query and key heads differ without "
                                 "enable_gqa")
    if causal:
        Tq, Tk = q.shape[-2], k.shape[-2]
        tri = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        mask = tri if mask is None else (mask & tri if mask.dtype == torch.bool
                                         else mask.masked_fill(~tri, float("-inf")))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    R = _out(R_out)
    lead = q.shape[:-3]
    if len(lead) != 1:
        raise FunctionalGapError(f"{rec.describe()}: scaled_dot_product_attention with "
                                 f"{q.dim()}-d inputs has no rule yet (4-d expected)")
    res = attention_relevance(R.to(q.dtype), q, k, v, scale=scale, mask=mask)
    out: dict[int, Rel | None] = {}
    for t, r in zip((q, k, v), res[:3]):
        idx = next((n for n, x in enumerate(rec.inputs) if x is t), None)
        if idx is not None and idx in _call(rec).derived:
            out[idx] = radd(out.get(idx), r.to(R.dtype))
    return _result(rec, out, res[3])


def max_pool_call(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``F.max_pool*d`` and ``F.adaptive_max_pool*d``: each window's relevance to its
    winner, ties split (as the ``nn`` pools)."""
    call = _call(rec)
    i = _first_derived(rec)
    x = _value(rec, i)
    R = _out(R_out)
    nd = int(call.name.rstrip("d")[-1])  # max_pool2d -> 2
    out_shape = rec.outputs[0].shape[-nd:]
    if call.name.startswith("adaptive"):
        tables = adaptive_tables(x, out_shape)
    else:
        k = _arg(call, 1, "kernel_size")
        tables = regular_tables(x, out_shape, k, _arg(call, 2, "stride") or k,
                                _arg(call, 3, "padding", 0), _arg(call, 4, "dilation", 1))
    parts = [pool_relevance(r, x, tables, "max") for r in R.unbind(0)]
    R_x = torch.stack([p[0] for p in parts])
    lost = torch.stack([p[1].double() for p in parts])
    return _result(rec, {i: R_x}, lost)


T = torch.Tensor
_ACTIVATIONS = (
    F.relu, torch.relu, T.relu, F.relu6, F.gelu, F.silu, F.mish, F.elu, F.selu, F.celu,
    F.leaky_relu, F.hardtanh, F.hardswish, F.hardsigmoid, F.softplus, F.tanh, torch.tanh,
    T.tanh, F.sigmoid, torch.sigmoid, T.sigmoid, F.softmax, torch.softmax, T.softmax,
    F.log_softmax, torch.log_softmax, T.log_softmax, F.dropout, torch.exp, T.exp, torch.neg,
    T.neg, T.__neg__, torch.abs, T.abs, torch.rsqrt, T.rsqrt, torch.sqrt, T.sqrt, torch.pow,
    T.pow, T.__pow__, T.float, T.double, T.half, T.bfloat16, T.to, T.type_as, T.square,
    torch.square, T.relu_, F.relu_, T.sigmoid_, T.tanh_,
    T.exp_, T.neg_, T.abs_, T.sqrt_, T.rsqrt_, T.pow_, torch.clamp, T.clamp, T.clamp_,
    torch.clamp_min, T.clamp_min, torch.clamp_max, T.clamp_max, torch.clip, T.clip,
    F.normalize,
)
register_function_rule(*_ACTIVATIONS, rule=passthrough_call)
_MAY_HOLD_CONSTANTS = {torch.where, T.where, F.pad, T.masked_fill, torch.masked_fill}
#: functions through which token ids carry relevance: lookups read them, copies move them
#: (a mask turned into floats, or combined with other tensors, is a constant)
INDEX_READERS = {F.embedding, torch.embedding}
INDEX_COPIES = {T.contiguous, T.clone, torch.clone, T.reshape, torch.reshape, T.flatten,
                torch.flatten}
register_function_rule(
    torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack,
    T.__getitem__, torch.gather, T.gather, torch.index_select, T.index_select, torch.where,
    T.where, F.pad, T.reshape, torch.reshape, T.flatten, torch.flatten, T.repeat,
    torch.repeat_interleave, T.repeat_interleave, torch.flip, T.flip, torch.roll, T.roll,
    torch.take_along_dim, T.take_along_dim, torch.tile, T.tile, T.masked_fill,
    torch.masked_fill, rule=routing_call)
register_function_rule(
    torch.add, T.add, T.__add__, T.__radd__, T.__iadd__, T.add_, torch.sub, T.sub,
    T.__sub__, T.__rsub__, T.__isub__, T.sub_, torch.subtract, rule=add_call)
register_function_rule(
    torch.mul, T.mul, T.__mul__, T.__rmul__, T.__imul__, T.mul_, torch.multiply, torch.div,
    T.div, T.__truediv__, T.__itruediv__, T.div_, torch.true_divide, rule=mul_call)
register_function_rule(
    torch.sum, T.sum, torch.mean, T.mean, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.interpolate,
    F.upsample, rule=linear_map_call)
register_function_rule(torch.matmul, T.matmul, T.__matmul__, torch.bmm, T.bmm,
                       rule=matmul_call)
register_function_rule(F.linear, rule=linear_call)
register_function_rule(torch.einsum, rule=einsum_call)
register_function_rule(torch.baddbmm, T.baddbmm, rule=baddbmm_call)
register_function_rule(torch.index_add, T.index_add, T.index_add_, rule=index_add_call)
register_function_rule(F.layer_norm, F.group_norm, rule=layer_norm_call)
register_function_rule(F.conv1d, F.conv2d, F.conv3d, rule=conv_call)
register_function_rule(F.embedding, rule=embedding_call)
register_function_rule(F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d,
                       F.adaptive_max_pool2d, F.adaptive_max_pool3d, rule=max_pool_call)
register_function_rule(F.scaled_dot_product_attention, rule=sdpa_call)
register_function_rule(torch.amax, T.amax, torch.max, T.max, rule=max_call)
# copies that keep the element order (a reshape, contiguous, clone): relevance moves with
# them, exactly, token ids included
register_function_rule(*INDEX_COPIES, rule=passthrough_call)
