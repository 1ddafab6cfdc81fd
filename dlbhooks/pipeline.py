"""``dlb.run_task``: the reference project's one-call interface — pick the task from the
model and the inputs, trace, explain, return the result."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .api import explain
from .errors import TargetError
from .generation import GenerationExplanation, explain_generation
from .results import Explanation

TASKS = ("tabular", "image", "text-classification", "causal-lm", "masked-lm", "generation")


def run_task(model: nn.Module, inputs: Any, task: str = "auto", tokenizer: Any = None,
             **options: Any) -> Explanation | GenerationExplanation:
    """Explain ``model`` on ``inputs`` for a task picked from them (``task="auto"``) or
    given: ``"tabular"`` (a float ``[batch, features]`` tensor), ``"image"`` (a float
    ``[batch, channels, H, W]`` tensor), ``"text-classification"``, ``"causal-lm"`` (the
    next token), ``"masked-lm"`` or ``"generation"`` (text: a string with ``tokenizer``,
    a tokenizer's output, or token ids). A ``max_new_tokens`` option asks for generation.

    ``options`` go to :func:`dlbhooks.explain` (``target``, ``mode``, ``multiplier``,
    ``temperature``, ``position``, ...) or, for generation, to
    :func:`dlbhooks.explain_generation` (``max_new_tokens``, sampling options). The
    picked task is ``result.info["pipeline"]``."""
    kind = _pick(model, inputs, tokenizer, options) if task == "auto" else task
    if kind not in TASKS:
        raise TargetError(f"unknown task {task!r}; choose 'auto' or one of {list(TASKS)}")
    if kind == "generation":
        if isinstance(inputs, str):
            if tokenizer is None:
                raise TargetError("text inputs need tokenizer=")
            result: Any = explain_generation(model, tokenizer, inputs, **options)
        else:
            ids = inputs["input_ids"] if isinstance(inputs, Mapping) else inputs
            result = explain_generation(model, ids, **options)
    else:
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs
                                       and isinstance(inputs[0], str)):
            if tokenizer is None:
                raise TargetError("text inputs need tokenizer=")
            inputs = dict(tokenizer(inputs, return_tensors="pt", padding=True))
        result = explain(model, inputs, **options)
    result.info["pipeline"] = kind
    return result


def _pick(model: nn.Module, inputs: Any, tokenizer: Any, options: dict) -> str:
    if "max_new_tokens" in options:
        return "generation"
    head = _head(model)
    text = isinstance(inputs, (str, Mapping)) or (isinstance(inputs, list) and inputs
                                                  and isinstance(inputs[0], str))
    if isinstance(inputs, Tensor) and not inputs.is_floating_point():
        text = True
    if text:
        if head is None:
            raise TargetError("text inputs for a model whose head is not a causal LM, a "
                              "sequence classifier or a masked LM: give task=")
        return head
    if isinstance(inputs, Tensor):
        if inputs.dim() == 4:
            return "image"
        if inputs.dim() == 2:
            return "tabular"
    raise TargetError(f"cannot tell the task from inputs of type {type(inputs).__name__}"
                      + (f" and shape {tuple(inputs.shape)}" if isinstance(inputs, Tensor)
                         else "") + f": give task= (one of {list(TASKS)})")


def _head(model: nn.Module) -> str | None:
    names = [type(model).__name__, *(getattr(getattr(model, "config", None),
                                             "architectures", None) or [])]
    for suffix, kind in (("ForCausalLM", "causal-lm"),
                         ("ForSequenceClassification", "text-classification"),
                         ("ForMaskedLM", "masked-lm")):
        if any(n.endswith(suffix) for n in names):
            return kind
    return None


__all__ = ["TASKS", "run_task"]
