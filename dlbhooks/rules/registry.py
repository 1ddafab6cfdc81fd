"""Rule registry: module type -> rule, most specific class first (MRO), plus names.

A rule follows the contract of :mod:`dlbhooks.rules.contract`: ``rule(record,
relevance_out, ctx) -> RuleResult``, relevance stacked on a leading axis (one entry per
contrastive stream). ``streamwise=True`` marks rules written for one stream's tensor
(no leading axis): the engine calls them once per stream. Rules of the first documented
form (returning a list or ``(list, absorbed)``) run through an adapter and warn.

Rules registered here are global. A :class:`RuleOverlay` (``dlb.trace(model, rules=...)``)
holds rules for one trace only, consulted together with the global registry: the most
specific class in the module's MRO wins, the overlay first at equal specificity.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .contract import is_stacked_form

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
    # written to the contract (returns RuleResult)? None: decided from the function
    stacked: bool | None = None
    # ``check(record) -> bool``: does a recorded call compute what the rule assumes? Asked
    # when the rule reaches a module only through a parent class (nn.LayerNorm's rule and
    # a channel-first LayerNorm2d subclass): if not, the module's calls are walked instead
    check: Callable[[Any], bool] | None = None

    def __post_init__(self) -> None:
        if self.stacked is None:
            object.__setattr__(self, "stacked", is_stacked_form(self.fn))
        if not self.stacked:
            _warn_legacy(self.name)


def _warn_legacy(name: str) -> None:
    warnings.warn(
        f"rule {name!r} is written to the first rule form (returning a list or (list, "
        "absorbed)); it runs through an adapter. Return dlbhooks.RuleResult and annotate "
        "the function `-> RuleResult` (relevance stacked on a leading stream axis; see "
        "README, 'Custom rules').", DeprecationWarning, stacklevel=5)


_BY_TYPE: dict[type, Rule] = {}  # registered by class
_BY_NAME: dict[str, Rule] = {}  # registered by dotted class name (and every class's name)
# lookups resolved through the MRO, cleared by every (un)registration so a change of the
# registry is seen at once
_RESOLVED: dict[type, Rule | None] = {}
# how many times the registry changed: overlays drop their own resolved lookups when it moves
_generation = 0


def _changed() -> None:
    global _generation
    _RESOLVED.clear()
    _generation += 1


def register_rule(
    module_type: type | str,
    fn: RuleFn | None = None,
    *,
    streamwise: bool = False,
    snapshot: tuple[str, ...] = (),
    name: str | None = None,
    check: Callable[[Any], bool] | None = None,
):
    """Register ``fn`` as the rule for ``module_type`` (usable as a decorator).

    ``module_type`` may also be a dotted class name (``"torchvision.ops.misc.SqueezeExcitation"``)
    so that optional libraries need not be imported. Registering again, by class or by
    name, replaces the rule: the latest registration for a class wins.
    """

    def deco(f: RuleFn) -> RuleFn:
        rule = Rule(f, name or getattr(f, "__name__", repr(f)), streamwise, tuple(snapshot),
                    check=check)
        key = module_type if isinstance(module_type, str) else _qualname(module_type)
        # a rule registered earlier for the class object under this name is replaced too
        for cls in [c for c in _BY_TYPE if _qualname(c) == key]:
            del _BY_TYPE[cls]
        if isinstance(module_type, type):
            _BY_TYPE[module_type] = rule
        _BY_NAME[key] = rule
        _changed()
        return f

    return deco(fn) if fn is not None else deco


def unregister_rule(module_type: type | str) -> None:
    """Remove the rule registered for ``module_type``, by class or by dotted name (no
    error if there is none)."""
    key = module_type if isinstance(module_type, str) else _qualname(module_type)
    _BY_NAME.pop(key, None)
    for cls in [c for c in _BY_TYPE if _qualname(c) == key]:
        del _BY_TYPE[cls]
    _changed()


def lookup(module_type: type, overlay: RuleOverlay | None = None) -> Rule | None:
    """The rule of the most specific registered class in ``module_type``'s MRO (by class
    or by dotted name); with an ``overlay``, its rules count too (first at equal
    specificity)."""
    if overlay is not None:
        return overlay.lookup(module_type)
    try:
        return _RESOLVED[module_type]
    except KeyError:
        pass
    found = None
    for cls in module_type.__mro__:
        found = _global(cls)
        if found is not None:
            break
    _RESOLVED[module_type] = found
    return found


def inherited(module_type: type, overlay: RuleOverlay | None = None) -> bool:
    """Does ``module_type`` get its rule only through a parent class (no rule registered
    for the class itself, by class or by name)?"""
    if overlay is not None and (module_type in overlay._by_type
                                or _qualname(module_type) in overlay._by_name):
        return False
    return _global(module_type) is None


def _global(cls: type) -> Rule | None:
    """The rule registered globally for exactly ``cls`` (by class or by dotted name)."""
    return _BY_TYPE.get(cls) or _BY_NAME.get(_qualname(cls))


class RuleOverlay:
    """Rules for one trace, over the global registry (``dlb.trace(model, rules=...)``).

    ``rules`` maps a module class or its dotted name to a rule: a function like those
    :func:`register_rule` takes (returning the relevance per input, or ``(relevance,
    absorbed)``) or a :class:`Rule` (to set ``streamwise`` or ``snapshot``). Lookups walk
    the module's MRO, most specific class first; at each class the overlay comes before
    the global registry. The global registry is never changed.
    """

    def __init__(self, rules: Mapping[type | str, RuleFn | Rule]):
        if not isinstance(rules, Mapping):
            raise TypeError(
                f"rules must be a mapping {{module class or dotted name: rule}}, got {rules!r}")
        self._by_type: dict[type, Rule] = {}
        self._by_name: dict[str, Rule] = {}
        for key, value in rules.items():
            if not isinstance(key, (type, str)):
                raise TypeError(
                    f"rules keys must be module classes or dotted class names, got {key!r}")
            rule = _as_rule(key, value)
            if isinstance(key, type):
                self._by_type[key] = rule
            self._by_name[key if isinstance(key, str) else _qualname(key)] = rule
        self._resolved: dict[type, Rule | None] = {}
        self._seen = _generation

    @classmethod
    def of(cls, rules: RuleOverlay | Mapping[type | str, RuleFn | Rule] | None
           ) -> RuleOverlay | None:
        """``rules`` as an overlay; ``None`` for none (or an empty mapping)."""
        if rules is None or isinstance(rules, RuleOverlay):
            return rules
        overlay = cls(rules)
        return overlay if len(overlay) else None

    def __len__(self) -> int:
        return len(self._by_name)

    def __repr__(self) -> str:
        return f"RuleOverlay({sorted(self._by_name)})"

    def lookup(self, module_type: type) -> Rule | None:
        """The rule of the most specific class in ``module_type``'s MRO, here or global."""
        if self._seen != _generation:  # the global registry changed since
            self._resolved.clear()
            self._seen = _generation
        try:
            return self._resolved[module_type]
        except KeyError:
            pass
        found = None
        for cls in module_type.__mro__:
            found = (self._by_type.get(cls) or self._by_name.get(_qualname(cls))
                     or _global(cls))
            if found is not None:
                break
        self._resolved[module_type] = found
        return found


def _as_rule(key: type | str, value: RuleFn | Rule) -> Rule:
    if isinstance(value, Rule):
        return value
    if not callable(value):
        raise TypeError(f"the rule for {key!r} must be a function or a registry.Rule, "
                        f"got {value!r}")
    return Rule(value, getattr(value, "__name__", repr(value)))


def rule_named(name: str) -> Rule | None:
    """The rule registered under a dotted class name."""
    return _BY_NAME.get(name)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
