"""The one-call entry point ``dlb.explain``: trace a model on inputs and explain them."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .explaining import explain_tape, select_output  # noqa: F401 (re-exported: old home)
from .results import Explanation
from .seeds import TASKS
from .trace import trace


def explain(
    model: nn.Module, inputs: Any, target: Any = None, *, storage: Any = None,
    rules: Mapping[type | str, Any] | None = None, **kwargs: Any,
) -> Explanation:
    """One call: trace ``model`` on ``inputs`` (a tensor, a tuple of positional arguments
    or a dict of keyword arguments) and explain ``target``; ``storage`` and ``rules`` go to
    :func:`dlbhooks.trace`, the other kwargs to ``tape.explain``. The tape is explained
    once, so its records are freed behind the reverse walk (``release=True``).

    A causal LM explained at its last position (the default) is asked for that position's
    logits only (transformers' ``logits_to_keep=1``, as ``generate`` does): the vocabulary
    projection of the other positions is neither computed nor recorded. Pass
    ``logits_to_keep=0`` in ``inputs`` to record the logits of every position."""
    kwargs.setdefault("release", not kwargs.get("share", False))
    extra = last_logits_only(model, inputs, kwargs)
    with trace(model, storage=storage, rules=rules) as tape:
        call_model(model, {**inputs, **extra} if extra else inputs)
    return tape.explain(target, **kwargs)


def last_logits_only(model: nn.Module, inputs: Any, options: Mapping[str, Any]) -> dict:
    """``{"logits_to_keep": 1}`` when explaining ``model`` on ``inputs`` with ``options``
    (``tape.explain``'s) needs the logits of the last position only: a forward that takes
    ``logits_to_keep`` (transformers' causal LMs), logits that may be kept in part
    (:func:`may_keep_some_logits`), explained at the default position (or -1), which is a
    real token in every row (no right padding); else ``{}``."""
    if not may_keep_some_logits(inputs, options) or not takes_logits_to_keep(model):
        return {}
    position = options.get("position")
    if not (position is None or (type(position) is int and position == -1)):
        return {}
    mask = inputs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2 and not bool((mask[:, -1] != 0).all()):
        return {}  # right padding: each row's last real token is elsewhere
    return {"logits_to_keep": 1}


def may_keep_some_logits(inputs: Any, options: Mapping[str, Any]) -> bool:
    """May a forward on ``inputs`` compute the explained positions' logits only (given
    that it takes ``logits_to_keep``)? Inputs by name that set neither it nor ``labels``
    (a loss needs every position), and the logits explained as classes (``options``:
    ``tape.explain``'s task and output)."""
    if not isinstance(inputs, Mapping) or "logits_to_keep" in inputs or "labels" in inputs:
        return False
    output = options.get("output")
    return (output is None or output == "logits") \
        and TASKS.get(options.get("task", "multiclass")) == "multiclass"


def takes_logits_to_keep(model: nn.Module) -> bool:
    """Does ``model``'s forward take transformers' ``logits_to_keep`` (the positions to
    compute logits for; its causal LMs do)?"""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping (a dict, a tokenizer's ``BatchEncoding``),
    ``model(*inputs)`` for a tuple or list, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
