"""``dlb.coverage(model)``: which rule each module gets; with example inputs, a traced dry
run that also covers the torch functions the forward calls and reports every gap."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .api import call_model
from .engine import Engine
from .errors import DLBError, UnsupportedModuleError
from .records import Record
from .rules import registry
from .rules.functions import FunctionCall, function_rule
from .trace import trace


@dataclass
class Coverage:
    """Per module path: the rule name, ``"children"`` (routed through its submodules) or
    ``None`` (a leaf with no rule: explaining it would fail).

    From a traced dry run (``example_inputs`` given): ``calls`` holds the same per
    recorded call, torch functions included (``where`` has their source lines), and
    ``error`` the error a default-mode explanation of the example raised (``None`` when
    it explained, with ``conservation`` its conservation error)."""

    rules: dict[str, str | None]
    calls: dict[str, str | None] | None = None
    where: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    conservation: float | None = None

    @property
    def missing(self) -> list[str]:
        table = self.calls if self.calls is not None else self.rules
        return [p for p, r in table.items() if r is None]

    @property
    def complete(self) -> bool:
        return not self.missing and self.error is None

    def __str__(self) -> str:
        table = self.calls if self.calls is not None else self.rules
        width = max((len(p) for p in table), default=4)
        head = "call" if self.calls is not None else "module"
        lines = [f"{head.ljust(width)}  rule"]
        for path, rule in table.items():
            name = rule or "MISSING: register a rule"
            if path in self.where:
                name += f"  ({self.where[path]})"
            lines.append(f"{(path or '<root>').ljust(width)}  {name}")
        what = "calls" if self.calls is not None else "modules"
        lines.append(
            f"{len(table) - len(self.missing)}/{len(table)} {what} covered"
            + (f"; missing: {', '.join(self.missing)}" if self.missing else ""))
        if self.calls is not None:
            lines.append(f"dry run: {self.error}" if self.error else
                         f"dry run: explained, conservation error {self.conservation:.2g}")
        return "\n".join(lines)


def coverage(
    model: nn.Module,
    example_inputs: Any = None,
    rules: Mapping[type | str, registry.RuleFn | registry.Rule] | None = None,
    *,
    explain: bool = True,
) -> Coverage:
    """The rule each module of ``model`` would get (with ``rules``, as under
    ``dlb.trace(model, rules=rules)``).

    Without ``example_inputs``, from the module tree alone: containers without a rule are
    routed through their children, and what their ``forward`` computes between them shows
    only when explaining. With ``example_inputs`` (a tensor, a tuple of positional
    arguments or a dict of keyword arguments), the model runs traced on them: every
    recorded call — modules and the torch functions of modules without a rule — gets its
    rule or is reported missing (functions with their source line), and, with
    ``explain=True``, one default-mode explanation is tried and its error reported.
    ``dlb.coverage(model, {Module: rule})`` (rules as the second argument) still works.
    """
    if rules is None and _looks_like_rules(example_inputs):
        rules, example_inputs = example_inputs, None
    overlay = registry.RuleOverlay.of(rules)
    static = _static(model, overlay)
    if example_inputs is None:
        return Coverage(static)
    with trace(model, rules=rules) as tape:
        call_model(model, example_inputs)
    engine = Engine(tape)
    calls: dict[str, str | None] = {}
    where: dict[str, str] = {}
    _visit(tape.last_root(), engine, calls, where)
    result = Coverage(static, calls, where)
    if explain:
        try:
            exp = tape.explain(keep=False)
        except DLBError as err:
            result.error = f"{type(err).__name__}: {err}"
        else:
            result.conservation = exp.conservation_error()
    return result


def _static(model: nn.Module, overlay: registry.RuleOverlay | None) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for path, m in model.named_modules():
        rule = registry.lookup(type(m), overlay)
        if rule is not None:
            out[path] = rule.name
        elif any(True for _ in m.children()):
            out[path] = "children"
        else:
            out[path] = None
    return out


def _visit(rec: Record, engine: Engine, calls: dict[str, str | None],
           where: dict[str, str]) -> None:
    """What the engine would do with ``rec``: its rule, or its children walked."""
    if isinstance(rec.module, FunctionCall):
        rule_fn = function_rule(rec.module.func)
        calls[rec.key] = getattr(rule_fn, "__name__", "function") if rule_fn else None
        where[rec.key] = rec.module.where
        return
    try:
        rule = engine._rule_for(rec)
    except UnsupportedModuleError:
        calls[rec.key] = None
        return
    if rule is not None:
        calls[rec.key] = rule.name
    elif rec.children:
        calls[rec.key] = "children"
        for child in rec.children:
            _visit(child, engine, calls, where)
    else:
        calls[rec.key] = None


def _looks_like_rules(obj: Any) -> bool:
    """A mapping of module classes or dotted class names to rules (the second argument
    before example inputs existed), not a dict of model inputs."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    return all(isinstance(k, type) or (isinstance(k, str) and "." in k) for k in obj) and \
        all(callable(v) or isinstance(v, registry.Rule) for v in obj.values())
