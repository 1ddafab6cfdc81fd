"""Mixture-of-experts (METHOD.md §5): fused expert weights of transformers 5.x.

``y_t = Σ_{e in top-k(t)} g_te · E_e(x_t)``. The relevance of ``y_t,h`` goes to the selected
experts ∝ ``|g_te · E_e(x_t)_h|`` (the add rule), then through each expert's MLP to
``x_t``: the §2 rule through ``down_proj``, the product rule on ``act(gate) · up``, the §2
rule through ``gate_up_proj``. Routing weights are constants: the router gets nothing.
Tokens are grouped per expert (one Python step per expert that received tokens, never
per token). The rule recomputes each expert's intermediates from the recorded inputs
(hidden states, top-k indices and weights) and the 3-D weights, whatever experts
implementation (grouped_mm, eager, ...) ran the forward.

Relevance per expert is reported as ``exp.experts[moe block path]`` = [batch, tokens,
experts] and the routing as ``exp.routing[moe block path]`` = (indices, weights). A block
with a shared expert (:func:`shared_expert_moe`) splits its output relevance over the routed
experts and the shared expert in one step; the shared expert is an extra last column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import DLBError, UnsupportedModuleError
from ..relevance import Rel, radd, rmap
from ..storage import check_tolerance
from .composite import LINEAR, MATMUL, add_split, first_stream, per_stream, require_child
from .contract import RuleContext, RuleResult
from .core import weighted_sum
from .elementwise import add_rule, saturation_bounds
from .registry import register_rule

if TYPE_CHECKING:
    from ..records import Record


@dataclass(frozen=True)
class ExpertsLayout:
    """How a family stores and applies its experts."""

    gate_up: str = "gate_up_proj"  # [E, 2I, H] (or [E, H, 2I] if transposed)
    down: str = "down_proj"  # [E, H, I] (or [E, I, H] if transposed)
    gate_up_bias: str | None = None
    down_bias: str | None = None
    transposed: bool = False  # weights used as x @ W (GPT-OSS)
    interleaved: bool = False  # gate = gu[..., ::2], up = gu[..., 1::2] (GPT-OSS)
    up_plus_one: bool = False  # (up + 1) * glu (GPT-OSS): the constant 1 keeps its share


FUSED = ExpertsLayout()
GPT_OSS = ExpertsLayout(gate_up_bias="gate_up_proj_bias", down_bias="down_proj_bias",
                        transposed=True, interleaved=True, up_plus_one=True)


def _split(gu: Tensor, layout: ExpertsLayout) -> tuple[Tensor, Tensor]:
    if layout.interleaved:
        return gu[..., ::2], gu[..., 1::2]
    gate, up = gu.chunk(2, dim=-1)
    return gate, up


def _merge(r_gate: Tensor, r_up: Tensor, layout: ExpertsLayout) -> Tensor:
    if layout.interleaved:
        return torch.stack((r_gate, r_up), dim=-1).flatten(-2)
    return torch.cat((r_gate, r_up), dim=-1)


def _activation(module, gate: Tensor, layout: ExpertsLayout) -> Tensor:
    if layout.up_plus_one:  # GPT-OSS clamped SwiGLU
        g = gate.clamp(max=module.limit)
        return g * torch.sigmoid(g * module.alpha)
    return module.act_fn(gate)


@dataclass
class _Group:
    """One expert's tokens and its recomputed intermediates (the forward, in ``dt``)."""

    e: int
    tok: Tensor
    slot: Tensor
    W_gu: Tensor
    W_d: Tensor
    b_gu: Tensor | None
    b_d: Tensor | None
    gu: Tensor
    upv: Tensor
    h: Tensor
    o: Tensor


def _maps(layout: ExpertsLayout):
    """``(forward, adjoint)`` of the experts' linear maps (``weighted_sum``)."""
    return MATMUL if layout.transposed else LINEAR


def _recompute(rec: Record, ctx: RuleContext, layout: ExpertsLayout,
               dt: torch.dtype) -> tuple[Tensor, list[_Group]]:
    """Every selected expert's weighted output ``g·E(x)`` as [T, k, H], grouped per expert."""
    m = rec.module
    x, idx, w = rec.inputs[0], rec.inputs[1], rec.inputs[2]
    Wgu, Wd = ctx.param(m, layout.gate_up), ctx.param(m, layout.down)
    bgu = ctx.param(m, layout.gate_up_bias) if layout.gate_up_bias else None
    bd = ctx.param(m, layout.down_bias) if layout.down_bias else None
    missing = [n for n, v in ((layout.gate_up, Wgu), (layout.down, Wd),
                              (layout.gate_up_bias, bgu), (layout.down_bias, bd))
               if n and not isinstance(v, Tensor)]
    if missing:
        raise DLBError(f"experts rule for {rec.describe()}: the module has no tensor "
                       f"{missing}; it does not have the layout the rule assumes ({layout})")
    T, k = idx.shape
    E = Wgu.shape[0]
    _check_shapes(rec, Wgu, Wd, x.shape[-1], layout)
    xs = x.to(dt)
    fwd = _maps(layout)[0]
    groups = []
    Y = xs.new_zeros(T, k, x.shape[-1])
    for e in torch.unique(idx).tolist():
        if not 0 <= e < E:
            continue  # masked slot (some routers use E as "no expert")
        tok, slot = torch.where(idx == e)
        W_gu, W_d = Wgu[e].to(dt), Wd[e].to(dt)
        b_gu = bgu[e].to(dt) if bgu is not None else None
        b_d = bd[e].to(dt) if bd is not None else None
        gu = fwd(xs[tok], W_gu) + (b_gu if b_gu is not None else 0)
        gate, up = _split(gu, layout)
        act = _activation(m, gate, layout)
        upv = up.clamp(-m.limit, m.limit) + 1 if layout.up_plus_one else up
        h = act * upv
        o = fwd(h, W_d) + (b_d if b_d is not None else 0)
        Y[tok, slot] = o * w[tok, slot, None].to(dt)
        groups.append(_Group(e, tok, slot, W_gu, W_d, b_gu, b_d, gu, upv, h, o))
    _check_output(rec, Y)
    return Y, groups


def _check_shapes(rec, Wgu: Tensor, Wd: Tensor, H: int, layout: ExpertsLayout) -> None:
    """The fused weights have the layout the rule assumes (else: an error, not a guess)."""
    ok = Wgu.dim() == 3 and Wd.dim() == 3 and Wgu.shape[0] == Wd.shape[0]
    if ok:
        (gi, go), (di, do) = ((Wgu.shape[1], Wgu.shape[2]), (Wd.shape[1], Wd.shape[2])) \
            if layout.transposed else ((Wgu.shape[2], Wgu.shape[1]), (Wd.shape[2], Wd.shape[1]))
        ok = gi == H and do == H and go == 2 * di
    if not ok:
        raise DLBError(
            f"experts rule for {rec.describe()}: weights {layout.gate_up} "
            f"{tuple(Wgu.shape)} and {layout.down} {tuple(Wd.shape)} do not have the layout "
            f"the rule assumes for hidden size {H} ({layout})")


def _tolerance(recorded: Tensor) -> float:
    """Relative tolerance of a recomputation check: the records' (looser when stored in low
    precision) or the rounding of the dtype the forward ran in, whichever is larger."""
    return max(check_tolerance(), 8 * torch.finfo(recorded.dtype).eps)


def _check_output(rec, Y: Tensor) -> None:
    """The recomputed experts, weighted and summed over the slots, give the recorded output
    (within the rounding of the forward's dtype): else the module's forward differs from
    what the rule recomputes (its activation, gating or weight layout)."""
    if not rec.outputs or not rec.output_intact(0):
        return  # modified in place later by the caller: nothing recorded to compare with
    out = rec.output_value(0)
    if out.numel() == 0:
        return
    got = Y.sum(1).reshape(out.shape)
    want = out.detach().to(got.dtype)
    tol = _tolerance(out)
    if not torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())):
        raise DLBError(
            f"experts rule for {rec.describe()}: recomputing the selected experts from the "
            "recorded inputs and the weights does not give the module's output; its forward "
            "differs from what the rule recomputes (activation, gating or weight layout)")


def routed_contributions(rec: Record, ctx: RuleContext, dt: torch.dtype) -> Tensor:
    """``g_te · E_e(x_t)`` of every token's selected experts, [T, k, H], for a recorded call
    of a fused experts module with a registered §5 rule (used by shared-expert blocks)."""
    rule = ctx.lookup(type(rec.module))
    layout = getattr(rule.fn, "layout", None) if rule is not None else None
    if layout is None:
        raise UnsupportedModuleError(
            f"{rec.describe()} is not a fused experts module with a registered experts rule")
    return _recompute(rec, ctx, layout, dt)[0]


def experts_rule_for(layout: ExpertsLayout):
    """The §5 rule for an experts module with this layout."""

    def experts_rule(rec: Record, R_out: list[Tensor | None],
                     ctx: RuleContext) -> RuleResult:
        m = rec.module
        x, idx, w = rec.inputs[0], rec.inputs[1], rec.inputs[2]
        R = R_out[0]
        assert R is not None
        T, k = idx.shape
        E = ctx.param(m, layout.gate_up).shape[0]
        dt = first_stream(R).dtype
        xs = x.to(dt)
        Y, groups = _recompute(rec, ctx, layout, dt)
        # 2. the add rule over each token's selected experts
        share_of, absorbed = per_stream(lambda r: _add_slots(r, Y), R)
        slot_idx = idx.clamp(0, E - 1)  # out-of-range slots carry no output, hence no share
        per_expert = rmap(
            lambda s: xs.new_zeros(T, E).scatter_add_(1, slot_idx, s.sum(-1)), share_of)
        # 3. through each expert's MLP to its tokens
        R_x = rmap(lambda r: torch.zeros_like(xs), R)
        bounds = None
        if ctx.saturation and not ctx.contrastive and hasattr(m, "act_fn"):
            bounds = saturation_bounds(m.act_fn)
        for g in groups:
            R_o = rmap(lambda s: s[g.tok, g.slot], share_of)  # g is a constant: all to E(x)
            R_xe, absorbed = _expert_relevance(R_o, g, xs, layout, bounds, absorbed)
            R_x = rmap(lambda acc, r: acc.index_add_(0, g.tok, r), R_x, R_xe)
        block = rec.parent.key if rec.parent is not None else rec.key
        shape = rec.input_views[0].shape[:-1] if 0 in rec.input_views else (1, T)
        ctx.report_experts(block, per_expert.reshape(per_expert.shape[0], *shape, E))
        ctx.report_routing(block, idx.reshape(*shape, k), w.reshape(*shape, k))
        return RuleResult([R_x, None, None], absorbed)

    experts_rule.layout = layout  # type: ignore[attr-defined]
    return experts_rule


def _expert_relevance(R_o: Rel, g: _Group, xs: Tensor, layout: ExpertsLayout, bounds,
                      absorbed: Rel | None) -> tuple[Rel, Rel | None]:
    """Relevance on one expert's tokens ``xs[g.tok]`` from ``R_o`` on its outputs: §2
    through ``down``, the product rule on ``act(gate) · up``, §2 through ``gate_up`` (with
    the activation's saturation ``bounds`` on the gate units). Returns it and ``absorbed``
    plus what this expert absorbed (added in that order: the totals stay bitwise)."""
    fwd, adj = _maps(layout)
    R_h, ab = weighted_sum(R_o, g.h, g.W_d, g.b_d, fwd, adj, output=g.o)
    absorbed = radd(absorbed, ab)
    r_act = R_h * 0.5  # product rule: half to each factor
    r_up = R_h * 0.5
    if layout.up_plus_one:  # (up + 1): the constant keeps |1| / (|up| + 1)
        upc = g.upv - 1
        frac = upc.abs() / (upc.abs() + 1)
        kept = r_up * frac
        absorbed = radd(absorbed, rmap(lambda r, q: (r - q).sum(), r_up, kept))
        r_up = kept
    R_gu = rmap(lambda a, u: _merge(a, u, layout), r_act, r_up)
    gu_bounds = None
    if bounds is not None:
        lo = torch.full_like(g.gu[0], -torch.inf)
        hi = torch.full_like(g.gu[0], torch.inf)
        _split(lo, layout)[0].fill_(bounds[0] if bounds[0] is not None else -torch.inf)
        _split(hi, layout)[0].fill_(bounds[1] if bounds[1] is not None else torch.inf)
        gu_bounds = (lo, hi)
    R_xe, ab = weighted_sum(R_gu, xs[g.tok], g.W_gu, g.b_gu, fwd, adj,
                            bounds=gu_bounds, output=g.gu)
    return R_xe, radd(absorbed, ab)


def _add_slots(R: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """Add rule over the k selected experts of each token: ([T, k, H] shares, lost)."""
    parts, lost = add_rule(R, list(Y.unbind(1)))
    return torch.stack(parts, dim=1), lost


@dataclass(frozen=True)
class SharedExpert:
    """An MoE block ``y = experts(x, idx, g) + σ(gate(x)) · shared(x)`` (Qwen2-MoE): the
    child names of the routed experts, the shared expert and its sigmoid gate (or None);
    ``label`` names the shared expert's column and its share in ``exp.blocks[block]``."""

    experts: str = "experts"
    shared: str = "shared_expert"
    gate: str | None = "shared_expert_gate"
    label: str = "shared"


def shared_expert_moe(spec: SharedExpert):
    """§5 with a shared expert: the block's output relevance is split in one step over the k
    selected routed experts and the (gated) shared expert, ∝ |contribution|. The gate is a
    constant like the routing weights. The shared expert is the last column of
    ``exp.experts[block]`` (named by :meth:`~dlbhooks.Explanation.expert_columns`)."""

    def rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
        er, sr = require_child(rec, spec.experts), require_child(rec, spec.shared)
        gr = require_child(rec, spec.gate) if spec.gate else None
        R = R_out[0]
        assert R is not None
        dt = first_stream(R).dtype
        H = rec.outputs[0].shape[-1]
        routed = routed_contributions(er, ctx, dt).abs().sum(1)  # Σ_slots |g·E(x)|, [T, H]
        shared = sr.output_value(0).to(dt)
        if gr is not None:
            shared = shared * torch.sigmoid(gr.output_value(0).to(dt))
        shared = shared.reshape(routed.shape)
        total = er.output_value(0).to(dt).reshape(routed.shape) + shared
        out = rec.outputs[0].to(dt).reshape(routed.shape)
        scale = float(out.abs().max().clamp_min(1))
        tol = _tolerance(rec.outputs[0])
        if not torch.allclose(total, out, rtol=tol, atol=tol * scale):
            raise DLBError(f"composite rule for {rec.describe()}: experts + gated shared expert "
                           "do not add up to the block's output; the spec does not fit")
        # one add rule over (slot 1, ..., slot k, shared): the routed slots' parts sum to
        # R·Σ|g·E(x)| / (Σ|g·E(x)| + |shared|); the experts rule then splits that part over
        # the slots ∝ |g·E(x)|, which gives each slot exactly R·|g·E(x)| / (Σ... + |shared|)
        (R_routed, R_shared), lost = add_split(rmap(lambda r: r.reshape(-1, H), R),
                                               [routed, shared])
        bag = ctx.new_bag(rec)
        bag.add(er.outputs[0], rmap(lambda r: r.reshape(er.outputs[0].shape), R_routed), rec)
        bag.add(sr.outputs[0], rmap(lambda r: r.reshape(sr.outputs[0].shape), R_shared), rec)
        ctx.report_block(rec.key, "routed", R_routed)
        ctx.report_block(rec.key, spec.label, R_shared)
        before = ctx.pop_experts(rec.key)  # earlier calls of the block (summed over calls)
        ctx.walk(rec.children, bag)
        routed_cols = ctx.pop_experts(rec.key)  # [S, ..., E] from the experts rule just now
        assert routed_cols is not None
        col = R_shared.detach().sum(-1).reshape(*routed_cols.shape[:-1], 1)
        ctx.report_experts(rec.key, radd(before, torch.cat(
            (routed_cols, col.to(routed_cols.dtype)), -1)))
        return RuleResult(ctx.collect(rec, bag), lost)

    rule.__name__ = "shared_expert_moe"
    rule.spec = spec  # type: ignore[attr-defined]
    return rule


def router_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """Routers: their outputs (logits, weights, indices) are constants for relevance."""
    return RuleResult([None] * len(rec.inputs))


M = "transformers.models"
for _path in (f"{M}.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts",
              f"{M}.olmoe.modeling_olmoe.OlmoeExperts",
              f"{M}.mixtral.modeling_mixtral.MixtralExperts",
              f"{M}.qwen2_moe.modeling_qwen2_moe.Qwen2MoeExperts",
              f"{M}.deepseek_v2.modeling_deepseek_v2.DeepseekV2Experts",
              f"{M}.deepseek_v3.modeling_deepseek_v3.DeepseekV3Experts",
              f"{M}.granitemoe.modeling_granitemoe.GraniteMoeExperts"):
    register_rule(_path, experts_rule_for(FUSED), name="experts")
register_rule(f"{M}.gpt_oss.modeling_gpt_oss.GptOssExperts", experts_rule_for(GPT_OSS),
              name="experts")
for _path in (f"{M}.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter",
              f"{M}.olmoe.modeling_olmoe.OlmoeTopKRouter",
              f"{M}.mixtral.modeling_mixtral.MixtralTopKRouter",
              f"{M}.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter",
              f"{M}.gpt_oss.modeling_gpt_oss.GptOssTopKRouter",
              f"{M}.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter",
              f"{M}.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter",
              f"{M}.granitemoe.modeling_granitemoe.GraniteMoeTopKRouter"):
    register_rule(_path, router_rule, name="router")
# DeepSeek-V2/V3: routed experts + an ungated shared expert, one add rule over both
_DEEPSEEK_SHARED = shared_expert_moe(SharedExpert(shared="shared_experts", gate=None))
for _path in (f"{M}.deepseek_v2.modeling_deepseek_v2.DeepseekV2Moe",
              f"{M}.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE"):
    register_rule(_path, _DEEPSEEK_SHARED, name="shared_expert_moe")
