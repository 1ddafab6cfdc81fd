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
experts] and the routing as ``exp.routing[moe block path]`` = (indices, weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..relevance import Streams, radd, rmap
from .core import weighted_sum
from .elementwise import add_rule, saturation_bounds
from .registry import register_rule


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
    return gu.chunk(2, dim=-1)


def _merge(r_gate: Tensor, r_up: Tensor, layout: ExpertsLayout) -> Tensor:
    if layout.interleaved:
        return torch.stack((r_gate, r_up), dim=-1).flatten(-2)
    return torch.cat((r_gate, r_up), dim=-1)


def _activation(module, gate: Tensor, layout: ExpertsLayout) -> Tensor:
    if layout.up_plus_one:  # GPT-OSS clamped SwiGLU
        g = gate.clamp(max=module.limit)
        return g * torch.sigmoid(g * module.alpha)
    return module.act_fn(gate)


def experts_rule_for(layout: ExpertsLayout):
    """The §5 rule for an experts module with this layout."""

    def experts_rule(rec, R_out, ctx):
        m = rec.module
        x, idx, w = rec.inputs[0], rec.inputs[1], rec.inputs[2]
        R = R_out[0]
        Wgu, Wd = ctx.param(m, layout.gate_up), ctx.param(m, layout.down)
        bgu = ctx.param(m, layout.gate_up_bias) if layout.gate_up_bias else None
        bd = ctx.param(m, layout.down_bias) if layout.down_bias else None
        T, k = idx.shape
        E = Wgu.shape[0]
        dt = R.pos.dtype if isinstance(R, Streams) else R.dtype
        xs = x.to(dt)
        # 1. every selected expert's weighted output g·E(x), grouped per expert
        groups = []
        Y = xs.new_zeros(T, k, x.shape[-1])
        for e in torch.unique(idx).tolist():
            if not 0 <= e < E:
                continue  # masked slot (some routers use E as "no expert")
            tok, slot = torch.where(idx == e)
            We_gu = Wgu[e].to(dt)
            We_d = Wd[e].to(dt)
            fwd_gu = (lambda a, W: a @ W) if layout.transposed else (lambda a, W: a @ W.T)
            gu = fwd_gu(xs[tok], We_gu) + (bgu[e].to(dt) if bgu is not None else 0)
            gate, up = _split(gu, layout)
            act = _activation(m, gate, layout)
            upv = up.clamp(-m.limit, m.limit) + 1 if layout.up_plus_one else up
            h = act * upv
            fwd_d = (lambda a, W: a @ W) if layout.transposed else (lambda a, W: a @ W.T)
            o = fwd_d(h, We_d) + (bd[e].to(dt) if bd is not None else 0)
            Y[tok, slot] = o * w[tok, slot, None].to(dt)
            groups.append((e, tok, slot, We_gu, We_d, gu, upv, h, o, fwd_gu, fwd_d))
        # 2. the add rule over each token's selected experts
        absorbed = None
        shares = rmap(lambda r: _add_slots(r, Y), R)
        share_of = rmap(lambda s: s[0], shares)
        absorbed = radd(absorbed, rmap(lambda s: s[1], shares))
        slot_idx = idx.clamp(0, E - 1)  # out-of-range slots carry no output, hence no share
        per_expert = rmap(
            lambda s: xs.new_zeros(T, E).scatter_add_(1, slot_idx, s.sum(-1)), share_of)
        # 3. through each expert's MLP to its tokens
        R_x = rmap(lambda r: torch.zeros_like(xs), R)
        bounds = None
        if ctx.saturation and not ctx.contrastive and hasattr(m, "act_fn"):
            b = saturation_bounds(m.act_fn)
            if b is not None:
                bounds = b
        for (e, tok, slot, We_gu, We_d, gu, upv, h, o, fwd_gu, fwd_d) in groups:
            R_o = rmap(lambda s: s[tok, slot], share_of)  # g is a constant: all to E(x)
            adj_d = (lambda s, W: s @ W.T) if layout.transposed else (lambda s, W: s @ W)
            R_h, ab = weighted_sum(R_o, h, We_d, bd[e].to(dt) if bd is not None else None,
                                   fwd_d, adj_d, output=o)
            absorbed = radd(absorbed, ab)
            r_act = rmap(lambda r: r * 0.5, R_h)  # product rule: half to each factor
            r_up = rmap(lambda r: r * 0.5, R_h)
            if layout.up_plus_one:  # (up + 1): the constant keeps |1| / (|up| + 1)
                upc = upv - 1
                frac = upc.abs() / (upc.abs() + 1)
                kept = rmap(lambda r: r * frac, r_up)
                absorbed = radd(absorbed, rmap(lambda r, q: (r - q).sum(), r_up, kept))
                r_up = kept
            R_gu = rmap(lambda a, u: _merge(a, u, layout), r_act, r_up)
            gu_bounds = None
            if bounds is not None:
                lo = torch.full_like(gu[0], -torch.inf)
                hi = torch.full_like(gu[0], torch.inf)
                g_lo, g_hi = _split(lo, layout)
                g_lo.fill_(bounds[0] if bounds[0] is not None else -torch.inf)
                _split(hi, layout)[0].fill_(bounds[1] if bounds[1] is not None else torch.inf)
                gu_bounds = (lo, hi)
            adj_gu = (lambda s, W: s @ W.T) if layout.transposed else (lambda s, W: s @ W)
            R_xe, ab = weighted_sum(R_gu, xs[tok], We_gu,
                                    bgu[e].to(dt) if bgu is not None else None,
                                    fwd_gu, adj_gu, bounds=gu_bounds, output=gu)
            absorbed = radd(absorbed, ab)
            R_x = rmap(lambda acc, r: acc.index_add_(0, tok, r), R_x, R_xe)
        block = rec.parent.key if rec.parent is not None else rec.key
        shape = rec.input_views[0].shape[:-1] if 0 in rec.input_views else (1, T)
        ctx.keep_tensor("experts", block, rmap(lambda p: p.reshape(*shape, E), per_expert))
        ctx.reports.setdefault("routing", {})[block] = (
            idx.reshape(*shape, k).detach(), w.reshape(*shape, k).detach())
        return [R_x, None, None], absorbed

    return experts_rule


def _add_slots(R: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
    """Add rule over the k selected experts of each token: ([T, k, H] shares, lost)."""
    parts, lost = add_rule(R, list(Y.unbind(1)))
    return torch.stack(parts, dim=1), lost


def router_rule(rec, R_out, ctx):
    """Routers: their outputs (logits, weights, indices) are constants for relevance."""
    return [None] * len(rec.inputs)


M = "transformers.models"
for _path in (f"{M}.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts",
              f"{M}.olmoe.modeling_olmoe.OlmoeExperts",
              f"{M}.mixtral.modeling_mixtral.MixtralExperts",
              f"{M}.qwen2_moe.modeling_qwen2_moe.Qwen2MoeExperts"):
    register_rule(_path, experts_rule_for(FUSED), name="experts")
register_rule(f"{M}.gpt_oss.modeling_gpt_oss.GptOssExperts", experts_rule_for(GPT_OSS),
              name="experts")
for _path in (f"{M}.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter",
              f"{M}.olmoe.modeling_olmoe.OlmoeTopKRouter",
              f"{M}.mixtral.modeling_mixtral.MixtralTopKRouter",
              f"{M}.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter",
              f"{M}.gpt_oss.modeling_gpt_oss.GptOssTopKRouter"):
    register_rule(_path, router_rule, name="router")
