"""``dlb.coverage(model)``: which rule each module gets, before running anything."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from .rules import registry


@dataclass
class Coverage:
    """Per module path: the rule name, ``"children"`` (routed through its submodules) or
    ``None`` (a leaf with no rule: explaining it would fail)."""

    rules: dict[str, str | None]

    @property
    def missing(self) -> list[str]:
        return [p for p, r in self.rules.items() if r is None]

    @property
    def complete(self) -> bool:
        return not self.missing

    def __str__(self) -> str:
        width = max((len(p) for p in self.rules), default=4)
        lines = [f"{'module'.ljust(width)}  rule"]
        for path, rule in self.rules.items():
            lines.append(f"{(path or '<root>').ljust(width)}  {rule or 'MISSING: register a rule'}")
        lines.append(
            f"{len(self.rules) - len(self.missing)}/{len(self.rules)} modules covered"
            + (f"; missing: {', '.join(self.missing)}" if self.missing else "")
        )
        return "\n".join(lines)


def coverage(
    model: nn.Module,
    rules: Mapping[type | str, registry.RuleFn | registry.Rule] | None = None,
) -> Coverage:
    """The rule each module of ``model`` would get (with ``rules``, as under
    ``dlb.trace(model, rules=rules)``). Containers without a rule are routed through their
    children; whether their forward hides functional maths only shows when explaining (a
    :class:`~dlbhooks.errors.FunctionalGapError` names it)."""
    overlay = registry.RuleOverlay.of(rules)
    out: dict[str, str | None] = {}
    for path, m in model.named_modules():
        rule = registry.lookup(type(m), overlay)
        if rule is not None:
            out[path] = rule.name
        elif any(True for _ in m.children()):
            out[path] = "children"
        else:
            out[path] = None
    return Coverage(out)
