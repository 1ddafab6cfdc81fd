"""The one-call entry point ``dlb.explain``: trace a model on inputs and explain them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .explaining import explain_tape, select_output  # noqa: F401 (re-exported: old home)
from .results import Explanation
from .trace import trace


def explain(
    model: nn.Module, inputs: Any, target: Any = None, *, storage: Any = None,
    rules: Mapping[type | str, Any] | None = None, **kwargs: Any,
) -> Explanation:
    """One call: trace ``model`` on ``inputs`` (a tensor, a tuple of positional arguments
    or a dict of keyword arguments) and explain ``target``; ``storage`` and ``rules`` go to
    :func:`dlbhooks.trace`, the other kwargs to ``tape.explain``. The tape is explained
    once, so its records are freed behind the reverse walk (``release=True``)."""
    kwargs.setdefault("release", not kwargs.get("share", False))
    with trace(model, storage=storage, rules=rules) as tape:
        call_model(model, inputs)
    return tape.explain(target, **kwargs)


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping (a dict, a tokenizer's ``BatchEncoding``),
    ``model(*inputs)`` for a tuple or list, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
