"""Rule registry: module type -> rule, most specific class first (MRO), plus names.

A rule takes ``(record, relevance_out, ctx)`` — the record of one call, the relevance on
each of its outputs (a list aligned with ``record.outputs``) and the engine context — and
returns the relevance on each input (a list aligned with ``record.inputs``; ``None`` for
inputs that get none, such as masks), optionally with what it absorbed:
``(relevance_in, absorbed)``.

``streamwise=True`` marks rules that never mix the two contrastive streams: they are
written for one tensor and the engine calls them once per stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

RuleFn = Callable[..., Any]


@dataclass(frozen=True)
class Rule:
    """A registered rule: the function, its name and how it treats contrastive streams."""

    fn: RuleFn
    name: str
    streamwise: bool = False
    # child paths (relative) whose outputs the tracer clones at call time, for composite
    # rules whose module later modifies them in place (``out += identity``)
    snapshot: tuple[str, ...] = field(default_factory=tuple)


_BY_TYPE: dict[type, Rule] = {}  # registered by class
_BY_NAME: dict[str, Rule] = {}  # registered by dotted class name (and every class's name)
# lookups resolved through the MRO, cleared by every (un)registration so a change of the
# registry is seen at once
_RESOLVED: dict[type, Rule | None] = {}


def register_rule(
    module_type: type[nn.Module] | str,
    fn: RuleFn | None = None,
    *,
    streamwise: bool = False,
    snapshot: tuple[str, ...] = (),
    name: str | None = None,
):
    """Register ``fn`` as the rule for ``module_type`` (usable as a decorator).

    ``module_type`` may also be a dotted class name (``"torchvision.ops.misc.SqueezeExcitation"``)
    so that optional libraries need not be imported. Registering again, by class or by
    name, replaces the rule: the latest registration for a class wins.
    """

    def deco(f: RuleFn) -> RuleFn:
        rule = Rule(f, name or getattr(f, "__name__", repr(f)), streamwise, tuple(snapshot))
        key = module_type if isinstance(module_type, str) else _qualname(module_type)
        # a rule registered earlier for the class object under this name is replaced too
        for cls in [c for c in _BY_TYPE if _qualname(c) == key]:
            del _BY_TYPE[cls]
        if isinstance(module_type, type):
            _BY_TYPE[module_type] = rule
        _BY_NAME[key] = rule
        _RESOLVED.clear()
        return f

    return deco(fn) if fn is not None else deco


def unregister_rule(module_type: type[nn.Module] | str) -> None:
    """Remove the rule registered for ``module_type``, by class or by dotted name (no
    error if there is none)."""
    key = module_type if isinstance(module_type, str) else _qualname(module_type)
    _BY_NAME.pop(key, None)
    for cls in [c for c in _BY_TYPE if _qualname(c) == key]:
        del _BY_TYPE[cls]
    _RESOLVED.clear()


def lookup(module_type: type) -> Rule | None:
    """The rule of the most specific registered class in ``module_type``'s MRO (by class
    or by dotted name)."""
    try:
        return _RESOLVED[module_type]
    except KeyError:
        pass
    found = None
    for cls in module_type.__mro__:
        found = _BY_TYPE.get(cls) or _BY_NAME.get(_qualname(cls))
        if found is not None:
            break
    _RESOLVED[module_type] = found
    return found


def rule_named(name: str) -> Rule | None:
    """The rule registered under a dotted class name."""
    return _BY_NAME.get(name)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
