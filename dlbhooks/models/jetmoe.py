"""JetMoE (METHOD.md §5): scattered experts in the MLP and in attention (mixture of attention).

JetMoE's experts are :class:`JetMoeParallelExperts` (weights [E, out, in]) applied to rows
grouped per expert: the block gathers each token's row once per selected expert
(``x[batch_index]``, sorted by expert), runs the experts, weights the rows by the gates,
scatters them back with ``index_add`` and adds a bias. Hooks see the router and the two
expert layers but not the gather, the gating, the scatter or the bias: the composites below
do those and walk the children's records.

* MLP (``JetMoeMoE``): ``y_t = Σ_{s} g_ts · down_e(act(gate_e x_t) · up_e x_t) + b``.
* Attention (``JetMoeAttention`` with a ``JetMoeMoA``, whose ``map``/``reduce`` are plain
  methods): each selected expert e projects the token's queries (``input_linear``), the
  attention runs over ``top_k · kv_heads`` heads whose keys/values are the shared ``kv_proj``
  heads repeated top_k times, and expert e projects its heads' outputs back
  (``output_linear``); ``y_t = Σ_s g_ts · out_e(attn_ts) + b``.

Relevance of ``y_t,h`` goes to the k selected slots and the bias ∝ |term| (the add rule; the
bias keeps its share), gates are constants, the expert layers use §2 per expert, the gated
product the product rule, RoPE the §2 rule on its 2×2 rotation, the attention call its own
rule (§4, recorded by our attention function). ``exp.experts`` holds [batch, tokens, experts]
for the MLP block (its path) and for the attention experts (``<attention path>.experts``),
``exp.routing`` the selections and gates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import DLBError, UnsupportedModuleError
from ..relevance import Rel, radd, rmap
from ..rules.composite import first_stream, linear_adj, linear_fwd, per_stream, require_child
from ..rules.contract import RuleContext, RuleResult
from ..rules.core import weighted_sum
from ..rules.elementwise import add_rule, product_rule, saturation_bounds
from ..rules.functional import close_to_recorded, rope_relevance
from ..rules.linear import exact_output
from .hf_attention import CHILD as ATTN

if TYPE_CHECKING:
    from ..records import Record


@dataclass(frozen=True)
class ScatteredExperts:
    """Child names of a JetMoE-style expert block (relative to the rule's module).

    ``activation``: the MLP's ``act(first half) * second half`` between the two expert
    layers (None: the experts' first layer feeds something else, e.g. attention).
    ``bias``: the block's output bias, a parameter of ``owner`` (``""``: the module itself).
    """

    router: str = "router"
    input_linear: str = "input_linear"
    output_linear: str = "output_linear"
    activation: str | None = "activation"
    bias: str = "bias"
    owner: str = ""


@dataclass(frozen=True)
class MixtureOfAttention:
    """A JetMoE-style attention module: its experts (``experts``: a ScatteredExperts spec
    whose names include the MoA child prefix) and the shared key/value projection."""

    experts: ScatteredExperts = ScatteredExperts(
        router="experts.router", input_linear="experts.input_linear",
        output_linear="experts.output_linear", activation=None, owner="experts")
    kv_proj: str = "kv_proj"


# -- the expert layers -------------------------------------------------------------------


def _segments(rec) -> list[tuple[int, int, int]]:
    """(expert, start, stop) of each non-empty group of rows of a ParallelExperts call."""
    sizes = rec.arguments.get("expert_size")
    if sizes is None:
        raise UnsupportedModuleError(f"{rec.describe()}: no expert_size argument recorded")
    sizes = sizes.tolist() if isinstance(sizes, Tensor) else list(sizes)
    out, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            out.append((e, start, start + int(n)))
        start += int(n)
    return out


def _gate_bounds(rec: Record, ctx: RuleContext, units: int):
    """Per-unit saturation bounds for an expert layer whose first half feeds the block's
    activation (the MLP's ``act(gate) * up``), from the parent's composite spec."""
    if not ctx.saturation or ctx.contrastive or rec.parent is None:
        return None
    rule = ctx.lookup(type(rec.parent.module))
    spec = getattr(getattr(rule, "fn", None), "spec", None)
    if not isinstance(spec, ScatteredExperts) or spec.activation is None:
        return None
    if rec.path != rec.parent.path_of(spec.input_linear):
        return None
    b = saturation_bounds(getattr(rec.parent.module, spec.activation))
    if b is None:
        return None
    lo = torch.full((units,), -torch.inf, dtype=torch.float64)
    hi = torch.full((units,), torch.inf, dtype=torch.float64)
    if b[0] is not None:
        lo[: units // 2] = b[0]
    if b[1] is not None:
        hi[: units // 2] = b[1]
    return lo, hi


def parallel_experts_rule(rec: Record, R_out: list[Tensor | None],
                          ctx: RuleContext) -> RuleResult:
    """``JetMoeParallelExperts``: rows grouped per expert, ``y = x W_eᵀ`` (§2 per group)."""
    W = ctx.param(rec.module, "weight")
    x = rec.input_value(0)
    R = R_out[0]
    dt = first_stream(R).dtype
    out = exact_output(rec, ctx)
    bounds = _gate_bounds(rec, ctx, W.shape[1])
    if bounds is not None:
        bounds = tuple(b.to(device=x.device, dtype=dt) for b in bounds)
    R_x = rmap(lambda r: torch.zeros(x.shape, dtype=r.dtype, device=r.device), R)
    absorbed = None
    for e, a, b in _segments(rec):
        R_e, ab = weighted_sum(
            rmap(lambda r: r[a:b], R), x[a:b].to(dt), W[e].to(dt), None,
            linear_fwd, linear_adj, bounds=bounds,
            output=None if out is None else out[a:b].to(dt))
        absorbed = radd(absorbed, ab)
        R_x = rmap(lambda acc, r: acc.index_copy_(0, torch.arange(a, b, device=acc.device), r),
                   R_x, R_e)
    return RuleResult([R_x], absorbed)


# -- shared pieces of the two composites -------------------------------------------------


def _child(rec, name: str):
    return require_child(rec, name, expected="what the JetMoE rule expects")


@dataclass
class _Routing:
    order: Tensor  # [N] flat (token·k + slot) position of each expert-sorted row
    token: Tensor  # [N] token of each sorted row
    expert: Tensor  # [N] expert of each sorted row
    gates: Tensor  # [N]
    T: int
    k: int
    E: int


def _routing(router, layer, n_tokens: int) -> _Routing:
    order, token, gates = router.outputs[0], router.outputs[1], router.outputs[2]
    segs = _segments(layer)
    expert = torch.empty_like(order)
    for e, a, b in segs:
        expert[a:b] = e
    E = layer.module.num_experts
    return _Routing(order, token, expert, gates, n_tokens, order.numel() // n_tokens, E)


def _slots(rt: _Routing, rows: Tensor) -> Tensor:
    """Expert-sorted rows [N, ...] back in (token, slot) order: [T, k, ...]."""
    out = rows.new_zeros(rows.shape)
    out[rt.order] = rows
    return out.view(rt.T, rt.k, *rows.shape[1:])


def _sorted(rt: _Routing, slots: Tensor) -> Tensor:
    """[T, k, ...] in (token, slot) order -> expert-sorted rows [N, ...]."""
    return slots.reshape(rt.T * rt.k, *slots.shape[2:])[rt.order]


def _reduce(rec: Record, spec: ScatteredExperts, R: Rel, rt: _Routing, out_layer: Record,
            ctx: RuleContext, key: str,
            batch_shape: tuple):
    """``y = Σ_slots g · out_layer(...) + bias``: the add rule over the slots and the bias.
    Returns the relevance of out_layer's (expert-sorted) output rows and what was absorbed;
    reports relevance per expert and the routing under ``key``."""
    owner = rec.module.get_submodule(spec.owner) if spec.owner else rec.module
    bias = ctx.param(owner, spec.bias)
    dt = first_stream(R).dtype
    rows = out_layer.output_value(0).to(dt) * rt.gates[:, None].to(dt)
    Y = _slots(rt, rows)  # [T, k, H]
    H = Y.shape[-1]
    terms = list(Y.unbind(1)) + ([bias.to(dt)] if bias is not None else [])

    def split(r: Tensor):
        parts, lost = add_rule(r.reshape(rt.T, H), terms)
        kept = parts[-1].sum() if bias is not None else 0.0
        return torch.stack(parts[: rt.k], 1), lost + kept

    shares, absorbed = per_stream(split, R)  # [T, k, H] per stream
    flat = rt.token * rt.E + rt.expert
    per_expert = rmap(lambda s: s.new_zeros(rt.T * rt.E).index_add_(
        0, flat, _sorted(rt, s.sum(-1, keepdim=True))[:, 0]).view(*batch_shape, rt.E), shares)
    ctx.report_experts(key, per_expert)
    idx = _slots(rt, rt.expert[:, None])[..., 0]
    w = _slots(rt, rt.gates[:, None])[..., 0]
    ctx.report_routing(key, idx.reshape(*batch_shape, rt.k), w.reshape(*batch_shape, rt.k))
    return rmap(lambda s: _sorted(rt, s), shares), absorbed


def _scatter_rows(rt: _Routing, R_rows: Rel, shape) -> Rel:
    """Relevance of the gathered rows ``x[token]`` back on ``x`` (summed per token)."""
    return rmap(lambda r: r.new_zeros(rt.T, r.shape[-1]).index_add_(0, rt.token, r)
                .view(shape), R_rows)


def _key(rec, suffix: str = "") -> str:
    base = rec.path_of(suffix) if suffix else (rec.path or "<root>")
    return base if rec.call == 0 else f"{base}#{rec.call}"


# -- MoE MLP -------------------------------------------------------------------------------


def scattered_moe(spec: ScatteredExperts):
    """Composite rule of a JetMoE MoE MLP block."""

    def rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
        x = rec.inputs[0]
        router = _child(rec, spec.router)
        lin_in, lin_out = _child(rec, spec.input_linear), _child(rec, spec.output_linear)
        act = _child(rec, spec.activation)
        rt = _routing(router, lin_in, x.numel() // x.shape[-1])
        R_rows, absorbed = _reduce(rec, spec, R_out[0], rt, lin_out, ctx, _key(rec),
                                   tuple(x.shape[:-1]))
        bag = ctx.new_bag(rec)
        bag.add(lin_out.outputs[0], R_rows, rec)
        ctx.step(lin_out, bag)
        R_h = bag.pop(lin_out.inputs[0])  # act(gate) * up
        gu = lin_in.output_value(0)
        gate, up = gu.chunk(2, dim=-1)
        if not close_to_recorded(act.output_value(0) * up, lin_out.inputs[0]):
            raise DLBError(f"{rec.describe()}: act(gate) * up does not give the experts' "
                           "input; the JetMoE spec does not fit this model")
        halves = rmap(lambda r: torch.stack(product_rule(r, [gate, up])), R_h)
        bag.add(act.outputs[0], rmap(lambda p: p[0], halves), rec)
        ctx.step(act, bag)  # relevance lands on the gate half of input_linear's output
        bag.add(lin_in.outputs[0], rmap(
            lambda p: torch.cat((torch.zeros_like(p[1]), p[1]), dim=-1), halves), rec)
        ctx.step(lin_in, bag)
        R_rows_in = bag.pop(lin_in.inputs[0])
        bag.add(x, _scatter_rows(rt, R_rows_in, x.shape), rec)
        return RuleResult(ctx.collect(rec, bag), absorbed)

    rule.__name__ = "scattered_moe"
    rule.spec = spec  # type: ignore[attr-defined]
    return rule


# -- mixture of attention --------------------------------------------------------------------


def mixture_of_attention(spec: MixtureOfAttention):
    """Composite rule of a JetMoE attention module (mixture of attention heads)."""
    ex = spec.experts

    def rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
        x = rec.inputs[0]
        b, s, H = x.shape
        router = _child(rec, ex.router)
        lin_in, lin_out = _child(rec, ex.input_linear), _child(rec, ex.output_linear)
        kv, attn = _child(rec, spec.kv_proj), _child(rec, ATTN)
        rt = _routing(router, lin_in, b * s)
        # 1. y = Σ_slots g · output_linear(attention heads of the slot) + bias
        R_rows, absorbed = _reduce(rec, ex, R_out[0], rt, lin_out, ctx, _key(rec, "experts"),
                                   (b, s))
        bag = ctx.new_bag(rec)
        bag.add(lin_out.outputs[0], R_rows, rec)
        ctx.step(lin_out, bag)
        # output_linear read the attention output's (token, slot) rows in expert order
        a_out = attn.outputs[0]  # [b, s, k·kv_heads, d]
        R_a = rmap(lambda r: _slots(rt, r).reshape(a_out.shape), bag.pop(lin_out.inputs[0]))
        bag.add(a_out, R_a, rec)
        # 2. the attention call (§4)
        ctx.step(attn, bag)
        q_rot, k_rep, v_rep = attn.inputs[:3]
        R_q, R_krep, R_vrep = (bag.pop(t) for t in (q_rot, k_rep, v_rep))
        d = q_rot.shape[3]
        kvh = k_rep.shape[1] // rt.k
        # keys / values are the kv_proj heads repeated once per slot: sum the copies
        R_k = rmap(lambda r: r.view(b, rt.k, kvh, s, d).sum(1), R_krep)
        R_v = rmap(lambda r: r.view(b, rt.k, kvh, s, d).sum(1), R_vrep)
        # 3. RoPE on queries (the experts' projections) and keys (kv_proj's first half)
        R_qp, R_kp, ab_q, ab_k = _unrotate(rec, rt, lin_in, kv, (b, s), R_q, R_k, q_rot,
                                           k_rep[:, :kvh])
        absorbed = radd(radd(absorbed, ab_q), ab_k)

        def heads_to_rows(r: Tensor) -> Tensor:  # [b, h, s, d] -> [b, s, h·d]
            return r.transpose(1, 2).reshape(b, s, -1)

        bag.add(kv.outputs[0], rmap(lambda rk, rv: torch.cat(
            (heads_to_rows(rk), heads_to_rows(rv)), dim=-1), R_kp, R_v), rec)
        ctx.step(kv, bag)
        # 4. queries: (token, slot) rows back to expert order, through input_linear
        bag.add(lin_in.outputs[0], rmap(
            lambda r: _sorted(rt, heads_to_rows(r).reshape(b * s, rt.k, -1)), R_qp), rec)
        ctx.step(lin_in, bag)
        bag.add(x, _scatter_rows(rt, bag.pop(lin_in.inputs[0]), x.shape), rec)
        return RuleResult(ctx.collect(rec, bag), absorbed)

    rule.__name__ = "mixture_of_attention"
    rule.spec = spec  # type: ignore[attr-defined]
    return rule


def _unrotate(rec, rt: _Routing, lin_in, kv, bs: tuple[int, int], R_q: Rel, R_k: Rel,
              q_rot: Tensor, k_rot: Tensor):
    """RoPE back (the §2 rule on its 2×2 rotation) from the attention's queries and keys
    ``q_rot``, ``k_rot`` to the experts' query projections (``lin_in``, rows in (token,
    slot) order) and the key half of ``kv``'s output, after checking that re-applying it
    gives the recorded values. Returns ``(R_q, R_k)`` before the rotation, [b, heads, s,
    d], and what each absorbed."""
    (b, s), nh, kvh, d = bs, q_rot.shape[1], k_rot.shape[1], q_rot.shape[3]
    cos, sin = rec.arguments["position_embeddings"]
    dt = first_stream(R_q).dtype
    q_pre = _slots(rt, lin_in.output_value(0).to(dt)).reshape(b, s, nh, d).transpose(1, 2)
    kv_out = kv.output_value(0).to(dt)
    k_pre = kv_out[..., : kvh * d].reshape(b, s, kvh, d).transpose(1, 2)
    c, sn = cos.unsqueeze(1).to(dt), sin.unsqueeze(1).to(dt)
    for pre, rot in ((q_pre, q_rot), (k_pre, k_rot)):
        again = pre * c + torch.cat((-pre[..., d // 2:], pre[..., : d // 2]), -1) * sn
        if not close_to_recorded(again, rot):
            raise DLBError(f"{rec.describe()}: re-applying RoPE to the recorded "
                           "projections does not give the attention's query/key; the "
                           "JetMoE spec does not fit this model")
    R_qp, ab_q = rope_relevance(R_q, q_pre, c, sn)
    R_kp, ab_k = rope_relevance(R_k, k_pre, c, sn)
    return R_qp, R_kp, ab_q, ab_k
