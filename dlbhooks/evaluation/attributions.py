"""Attribution methods to evaluate, as plain callables, and the score they explain.

An *attribution* is a callable ``attribute(model, inputs, target) -> Tensor``:

- ``inputs``: a float tensor ``[B, ...]`` (tabular rows, images) or a dict of the model's
  keyword inputs for a token model (``{"input_ids": [B, T], "attention_mask": [B, T]}``);
- ``target``: a LongTensor ``[B]`` (or an int) of class ids, or of token ids for a causal
  LM, explained at ``position`` (the last one unless the factory bound another);
- the result: relevance shaped like the perturbable input, the tensor's own shape, or
  ``[B, T]`` (one value per token) for token inputs; padding (``attention_mask`` 0) 0.

Factories: :func:`dlbhooks_attribution` (DLBacktrace, default or contrastive),
:func:`gradient_x_input`, :func:`integrated_gradients` (plain autograd), and the
baselines :func:`random_attribution` and :func:`recency_attribution`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..api import call_model, explain

Attribution = Callable[[nn.Module, Any, Any], Tensor]

__all__ = [
    "Attribution", "dlbhooks_attribution", "gradient_x_input", "integrated_gradients",
    "random_attribution", "recency_attribution", "score",
]


# -- inputs, targets, outputs ------------------------------------------------------------------
def is_token_input(inputs: Any) -> bool:
    """A mapping of model keyword inputs holding ``input_ids``."""
    return isinstance(inputs, Mapping) and "input_ids" in inputs


def token_mask(inputs: Mapping) -> Tensor:
    """``attention_mask`` as booleans ``[B, T]`` (all true without one)."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()


def as_target(target: Any, n: int, device: torch.device) -> Tensor:
    """``target`` as a LongTensor ``[n]`` on ``device`` (an int is repeated)."""
    t = torch.as_tensor(target, device=device).long()
    return t.expand(n).clone() if t.dim() == 0 else t.reshape(n)


def logits_of(out: Any) -> Tensor:
    """The logits of a model output: a tensor, ``.logits`` / ``["logits"]``, else the
    first tensor of a tuple."""
    if isinstance(out, Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, Mapping) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)):
        return next(o for o in out if isinstance(o, Tensor))
    raise TypeError(f"cannot find logits in a model output of type {type(out).__name__}")


def score_of(logits: Tensor, target: Any, metric: str = "prob", position: Any = -1) -> Tensor:
    """:func:`score` from the logits already computed."""
    n = len(logits)
    if logits.dim() == 1:
        logits = logits[:, None]
    if logits.dim() == 3:  # [B, T, V]: the explained position
        if isinstance(position, Tensor) and position.dim() > 0:
            logits = logits[torch.arange(n, device=logits.device), position.to(logits.device)]
        else:
            logits = logits[:, int(position)]
    if logits.dim() != 2:
        raise ValueError(f"expected logits [B, C] or [B, T, V], got {list(logits.shape)}")
    if metric == "prob":
        logits = logits.sigmoid() if logits.shape[-1] == 1 else logits.softmax(-1)
    elif metric != "logit":
        raise ValueError(f"metric must be 'prob' or 'logit', not {metric!r}")
    t = as_target(target, n, logits.device)
    return logits.gather(1, t[:, None])[:, 0]


def score(model: nn.Module, inputs: Any, target: Any, metric: str = "prob",
          position: Any = -1) -> Tensor:
    """The model's score for ``target``, ``[B]``: its softmax probability (``"prob"``) or
    its logit (``"logit"``). A single output unit's ``"prob"`` is its sigmoid (target 0).
    Logits with a sequence axis ``[B, T, V]`` are read at ``position`` (an int, negative
    from the end, or one per row). Runs under the caller's grad mode."""
    return score_of(logits_of(call_model(model, inputs)), target, metric, position)


def rows_of(value: Any, n: int, rows: Tensor) -> Any:
    """``value[rows]`` for a tensor whose first axis is the batch (``n``), else ``value``."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[rows.to(value.device)]
    return value


# -- DLBacktrace -----------------------------------------------------------------------------
def dlbhooks_attribution(mode: str = "default", key: str | None = None,
                         **explain_kwargs: Any) -> Attribution:
    """DLBacktrace through :func:`dlbhooks.explain` (``mode`` and ``explain_kwargs``, e.g.
    ``position=``, ``multiplier=``, go to it). Returns ``exp.inputs[key]``: by default
    ``input_ids`` for token inputs, else the first (for a tensor: the only) forward input.
    In contrastive mode ``exp.inputs`` is already the net relevance, positive minus
    negative stream."""

    def attribute(model: nn.Module, inputs: Any, target: Any) -> Tensor:
        exp = explain(model, inputs, target, mode=mode, **explain_kwargs)
        name = key or ("input_ids" if is_token_input(inputs) else next(iter(exp.inputs)))
        return exp.inputs[name]

    return attribute


# -- gradients -------------------------------------------------------------------------------
def _continuous(model: nn.Module, inputs: Any) -> tuple[Tensor, Callable[[Tensor], Any], Any]:
    """The differentiable input (the tensor, or the token embeddings), a function that
    rebuilds the model inputs from a stack of ``k`` copies of it, and the padding mask."""
    if not is_token_input(inputs):
        return inputs.detach(), lambda v: v, None
    ids = inputs["input_ids"]
    emb = cast(Any, model).get_input_embeddings()(ids).detach()  # a transformers model
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    n = len(ids)

    def build(v: Tensor) -> dict:
        k = len(v) // n
        return {"inputs_embeds": v, **{name: _repeat(t, n, k) for name, t in rest.items()}}

    return emb, build, token_mask(inputs)


def _repeat(value: Any, n: int, k: int) -> Any:
    """A batch tensor repeated ``k`` times along the batch (copy-major), else ``value``."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n and k > 1:
        return value.repeat(k, *[1] * (value.dim() - 1))
    return value


def _finish(attr: Tensor, mask: Tensor | None) -> Tensor:
    """Token inputs: summed over the hidden dimension, padding set to 0."""
    if mask is None:
        return attr
    return attr.sum(-1) * mask.to(attr.dtype)


def _position_rows(position: Any, k: int) -> Any:
    if isinstance(position, Tensor) and position.dim() > 0:
        return position.repeat(k)
    return position


def gradient_x_input(metric: str = "logit", position: Any = -1) -> Attribution:
    """Gradient × input: ``x ⊙ ∂s/∂x`` for the target's score ``s`` (:func:`score`,
    ``metric``). Token models: on the input embeddings ``e`` (``inputs_embeds=``), summed
    over the hidden dimension, ``Σ_h e_th ∂s/∂e_th`` ``[B, T]``."""

    def attribute(model: nn.Module, inputs: Any, target: Any) -> Tensor:
        x, build, mask = _continuous(model, inputs)
        with torch.enable_grad():
            x = x.clone().requires_grad_(True)
            s = score(model, build(x), target, metric, position)
            (grad,) = torch.autograd.grad(s.sum(), x)
        return _finish((grad * x).detach(), mask)

    return attribute


def integrated_gradients(steps: int = 32, baseline: Any = None, metric: str = "logit",
                         position: Any = -1, max_rows: int = 512) -> Attribution:
    """Integrated gradients, midpoint Riemann rule: ``(x - b) ⊙ (1/m) Σ_k ∂s/∂x (b +
    α_k (x - b))`` with ``α_k = (k + ½)/m``, ``m = steps``; ``baseline`` ``b`` defaults to
    zeros (token models: of the embeddings, a tensor broadcastable to ``[B, T, H]``).
    The path points are batched, at most ``max_rows`` model rows per forward."""
    if steps < 1:
        raise ValueError("steps must be at least 1")

    def attribute(model: nn.Module, inputs: Any, target: Any) -> Tensor:
        x, build, mask = _continuous(model, inputs)
        b = torch.zeros_like(x) if baseline is None else torch.as_tensor(
            baseline, dtype=x.dtype, device=x.device).expand_as(x)
        n = len(x)
        t = as_target(target, n, x.device)
        alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
        total = torch.zeros_like(x)
        chunk = max(1, max_rows // max(n, 1))
        for start in range(0, steps, chunk):
            a = alphas[start:start + chunk].view(-1, *[1] * x.dim())
            k = len(a)
            with torch.enable_grad():
                path = (b + a * (x - b)).reshape(k * n, *x.shape[1:]).requires_grad_(True)
                s = score(model, build(path), t.repeat(k), metric, _position_rows(position, k))
                (grad,) = torch.autograd.grad(s.sum(), path)
            total += grad.detach().view(k, *x.shape).sum(0)
        return _finish((x - b) * total / steps, mask)

    return attribute


# -- baselines -------------------------------------------------------------------------------
def random_attribution(seed: int = 0) -> Attribution:
    """Uniform noise in [0, 1), shaped like the attribution; the same for the same
    ``seed`` and shape (drawn on the CPU, then moved). Token inputs: ``[B, T]``, padding 0."""

    def attribute(model: nn.Module, inputs: Any, target: Any) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        if is_token_input(inputs):
            mask = token_mask(inputs)
            r = torch.rand(mask.shape, generator=gen, dtype=torch.get_default_dtype())
            return r.to(mask.device) * mask
        dtype = inputs.dtype if inputs.is_floating_point() else torch.get_default_dtype()
        return torch.rand(inputs.shape, generator=gen, dtype=dtype).to(inputs.device)

    return attribute


def recency_attribution() -> Attribution:
    """Token inputs only: a token's relevance is its position among the real tokens,
    1, 2, ..., n from the first to the last (later tokens more relevant); padding 0."""

    def attribute(model: nn.Module, inputs: Any, target: Any) -> Tensor:
        if not is_token_input(inputs):
            raise TypeError("recency_attribution needs token inputs (a dict with input_ids)")
        mask = token_mask(inputs)
        m = mask.to(torch.get_default_dtype())
        return m.cumsum(1) * m

    return attribute
