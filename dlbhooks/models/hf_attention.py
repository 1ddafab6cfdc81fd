"""Hugging Face attention: our own attention function, registered by name.

Inside ``dlb.trace`` a transformers model is switched (``config._attn_implementation``) to
the attention implementation ``"dlbhooks"``, registered with ``AttentionInterface`` — and
its mask builder with ``AttentionMaskInterface`` under the same name, without which the
causal mask is silently dropped. The function runs the model family's own eager attention
(GPT-2's ``_upcast_and_reordered_attn`` when its config asks for it), so outputs equal eager
attention bit for bit, except that a float64 mask is clamped to float32's minimum, so that
families whose eager softmax runs in float32 do not turn left-padded sequences to NaN. For a
model that was set to ``"sdpa"`` (transformers' default) it runs the registered ``"sdpa"``
function instead, so that the recorded forward costs what the model's own forward costs: a
purely causal mask goes as sdpa's causal flag, as in the model's own forward (the outputs
are then the model's own bit for bit); any other mask goes as the additive one (equal to
rounding). Eager still runs where only eager will do (soft-capping, sinks, a score bias,
dropout, attention weights asked for). It records Q, K (after RoPE and q/k norms), V,
the mask, scaling, soft-capping and sinks as a child record ``attention_fn`` of the
attention module. Its rule is METHOD.md §4
(:func:`dlbhooks.rules.attention.attention_relevance`). ``use_cache`` is switched off for
the recorded forward. Both settings are restored on exit. The private transformers
internals this needs are read and written only through :mod:`dlbhooks.models.hf_internals`.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from ..relevance import rmap
from ..rules.attention import _CLOSED, attention_relevance
from ..rules.contract import RuleContext, RuleResult
from ..rules.registry import register_rule
from ..storage import version_of
from ..trace import ACTIVE, SWITCHES
from .hf_internals import (
    TransformersInternalError,
    collected_outputs,
    get_attn_implementation,
    set_attn_implementation,
    upcast_attention,
)

if TYPE_CHECKING:
    from ..records import Record

NAME = "dlbhooks"
CHILD = "attention_fn"  # path suffix of the recorded attention call


class AttentionCall(nn.Module):
    """Stand-in module for records of the attention function (selects its rule)."""

    def forward(self, *args: Any) -> None:  # pragma: no cover - never called
        raise RuntimeError("AttentionCall only labels records")


ATTENTION_CALL = AttentionCall()
_EAGER: dict[type, Any] = {}


def family_eager(module: nn.Module):
    """The model family's own ``eager_attention_forward`` for this attention module."""
    fn = _EAGER.get(type(module))
    if fn is None:
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise UnsupportedModuleError(
                f"{type(module).__module__}.{type(module).__name__} has no module-level "
                "eager_attention_forward to reproduce; dlbhooks cannot record its attention"
            )
        _EAGER[type(module)] = fn
    return fn


def dlbhooks_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, *args: Any, **kwargs: Any):
    """Eager attention of the module's family, recorded for relevance."""
    if module.training and kwargs.get("dropout", 0.0):
        raise UnsupportedModuleError(
            f"{type(module).__name__}: attention dropout is active (training mode); "
            "call model.eval() before explaining"
        )
    if attention_mask is not None and attention_mask.dtype == torch.float64:
        # eager softmax runs in float32, where float64's finfo.min becomes -inf and a fully
        # masked (padding) row turns to NaN; float32's min gives the same zeros elsewhere
        attention_mask = attention_mask.clamp_min(torch.finfo(torch.float32).min)
    upcast = _upcast_path(module, attention_mask)
    wanted = _attentions_wanted()
    fused = _fused(module, kwargs, wanted) if upcast is None else None
    if fused is not None:  # the model's own sdpa: no [T, T] probabilities materialised
        # a purely causal mask goes as sdpa's causal flag, as the model's own forward
        # passes it (its kernel then skips the masked blocks: half the work)
        sdpa_mask = None if _causal_flag_fits(module, query, key, attention_mask, kwargs) \
            else attention_mask
        out, weights = fused(module, query, key, value, sdpa_mask, *args, **kwargs)
    elif upcast is not None:
        # GPT-2 family with reorder_and_upcast_attn: its eager path is this method (scores
        # and softmax in float32), not eager_attention_forward (which would differ in half
        # precision); the rule recomputes in float32 at least, as it does
        out, weights = upcast(query, key, value, attention_mask)
    else:
        out, weights = family_eager(module)(module, query, key, value, attention_mask, *args,
                                            **kwargs)
    out = out.contiguous()  # same values; the caller's reshape is then a view we can follow
    if ACTIVE:
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        sinks = kwargs.get("s_aux", getattr(module, "sinks", None))
        extras = {"mask": _score_terms(attention_mask, kwargs.get("position_bias")),
                  "scaling": float(scaling),
                  "softcap": kwargs.get("softcap"), "sinks": sinks}
        for tr in ACTIVE:
            tr.record_call(module, ATTENTION_CALL, CHILD,
                           {"query": query, "key": key, "value": value}, out, extras)
    # records would keep every layer's [batch, heads, T, T] probabilities alive through the
    # attention module's output; the rule recomputes them in chunks, so hand them on only
    # when the caller collects attentions (output_attentions=True)
    return out, weights if wanted else None


#: (weak reference to the last mask checked, its version, whether it is purely causal):
#: every layer of a forward receives the same mask, checked once
_CAUSAL_CHECK: list = [None]


def _causal_flag_fits(module: nn.Module, query: Tensor, key: Tensor, mask: Tensor | None,
                      kwargs: dict[str, Any]) -> bool:
    """May transformers' sdpa run this call with its causal flag instead of ``mask``, as
    the model's own forward does (``sdpa_mask`` gives no mask then)? When the call is
    causal (``is_causal`` or the module's default), the queries are the keys (no cache)
    and the additive or boolean ``mask`` is exactly the causal pattern: open (0 or True) on
    and below the diagonal, closed (-1e30 or less, or False) above, for every batch row."""
    if mask is None or mask.dim() != 4 or kwargs.get("position_bias") is not None:
        return False
    causal = kwargs.get("is_causal")
    if not (getattr(module, "is_causal", True) if causal is None else causal):
        return False
    T = query.shape[2]
    if T < 2 or key.shape[2] != T or tuple(mask.shape[-2:]) != (T, T):
        return False
    hit = _CAUSAL_CHECK[0]
    if hit is not None and hit[0]() is mask and hit[1] == version_of(mask):
        return hit[2]
    tri = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril_()
    if mask.dtype == torch.bool:
        fits = bool((mask == tri).all())
    else:
        fits = bool(((mask == 0) == tri).all()) and bool(((mask <= _CLOSED) != tri).all())
    _CAUSAL_CHECK[0] = (weakref.ref(mask), version_of(mask), fits)
    return fits


def _score_terms(mask: Tensor | None, position_bias: Tensor | None) -> Tensor | None:
    """What the eager attention adds to the scores: the mask and a score bias passed on
    its own (T5's relative ``position_bias``), as one additive mask for the rule (whose
    finite non-zero entries are a bias of step 3, METHOD §4)."""
    if position_bias is None:
        return mask
    bias = position_bias.detach()
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return bias + mask


def _upcast_path(module: nn.Module, mask: Tensor | None):
    """The module's own ``_upcast_and_reordered_attn`` if its eager attention runs it
    (GPT-2's ``reorder_and_upcast_attn``), else ``None``. Not with a float64 mask: that
    method then raises (its scores leave float32), so eager cannot run and the family's
    function stands in."""
    if mask is not None and mask.dtype == torch.float64:
        return None
    return upcast_attention(module)


def _fused(module: nn.Module, kwargs: dict[str, Any], weights_wanted: bool):
    """Transformers' registered ``"sdpa"`` attention if ``module``'s model was set to it
    before the trace and the call needs nothing only eager gives (soft-capping, sinks, a
    score bias, dropout, the attention weights: ``weights_wanted``); else ``None``."""
    config = getattr(module, "config", None)
    if config is None or _ORIGINAL.get(id(config)) != "sdpa":
        return None
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None \
            or getattr(module, "sinks", None) is not None \
            or kwargs.get("position_bias") is not None or kwargs.get("dropout", 0.0) \
            or weights_wanted:
        return None
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS.get("sdpa")


#: id(config) -> its attention implementation before the trace switched it (while tracing)
_ORIGINAL: dict[int, str | None] = {}


def _attentions_wanted() -> bool:
    """Whether transformers' output collector asks for attention weights (``True`` when
    no collector is active, e.g. an attention module called on its own)."""
    collected = collected_outputs()
    return collected is None or any("attention" in key for key in collected)


@register_rule(AttentionCall, name="attention")
def attention_call_rule(rec: Record, R_out: list[Tensor | None],
                        ctx: RuleContext) -> RuleResult:
    """§4 on the recorded call; relevance per head is reported in ``exp.heads``."""
    q, k, v = rec.inputs[:3]
    a = rec.arguments
    sinks = a.get("sinks")
    if sinks is not None:
        sinks = sinks.detach().to(q.dtype).view(1, -1, 1, 1)
    mask = a.get("mask")
    assert R_out[0] is not None
    R = R_out[0].transpose(2, 3)  # [S, b, s, h, d] -> [S, b, h, s, d]
    res = attention_relevance(R, q, k, v, scale=a["scaling"], mask=mask, sinks=sinks,
                              softcap=a.get("softcap"))
    parent = rec.parent.key if rec.parent is not None else rec.key
    ctx.report_heads(parent, rmap(lambda r: r.sum(dim=(-2, -1)), R))
    return RuleResult([res[0], res[1], res[2]], res[3])


def _configs(model: nn.Module):
    """Every transformers config reachable from the model (sub-configs included)."""
    from transformers import PreTrainedConfig

    seen: dict[int, Any] = {}

    def visit(cfg):
        if not isinstance(cfg, PreTrainedConfig) or id(cfg) in seen:
            return
        seen[id(cfg)] = cfg
        for key in getattr(cfg, "sub_configs", {}) or {}:
            visit(getattr(cfg, key, None))

    for m in model.modules():
        visit(getattr(m, "config", None))
    return list(seen.values())


def _ensure_registered() -> None:
    """Register the attention function and its mask builder (public API: the classes'
    ``register`` and the mapping interface of the instances models dispatch through)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for interface, table, fn in ((AttentionInterface, ALL_ATTENTION_FUNCTIONS,
                                  dlbhooks_attention),
                                 (AttentionMaskInterface, ALL_MASK_ATTENTION_FUNCTIONS,
                                  eager_mask)):
        if table.get(NAME) is not fn:
            interface.register(NAME, fn)
        if table.get(NAME) is not fn:
            raise TransformersInternalError(
                f"{interface.__name__}.register({NAME!r}, ...) did not make models dispatch "
                f"{NAME!r} to dlbhooks' function (a local override in the dispatch table?)"
            )


def switch_transformers(model: nn.Module):
    """Trace switch: dlbhooks attention and ``use_cache=False`` on every config; undo."""
    if "transformers" not in sys.modules:
        return None
    configs = _configs(model)
    if not configs:
        return None
    _ensure_registered()
    saved = [(c, get_attn_implementation(c), getattr(c, "use_cache", None)) for c in configs]

    mine: list[int] = []  # (a nested trace finds the outer trace's originals kept)

    def undo() -> None:
        for key in mine:
            _ORIGINAL.pop(key, None)
        for c, impl, cache in saved:
            set_attn_implementation(c, impl)
            if cache is not None:
                c.use_cache = cache

    try:
        for c, impl, cache in saved:
            if id(c) not in _ORIGINAL:
                _ORIGINAL[id(c)] = impl
                mine.append(id(c))
            set_attn_implementation(c, NAME)
            if cache is not None:
                c.use_cache = False
    except BaseException:
        with contextlib.suppress(Exception):  # the first error is the one to report
            undo()
        raise
    return undo


SWITCHES.append(switch_transformers)
