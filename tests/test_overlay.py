"""``dlb.trace(model, rules={...})``: rules for one trace, over the global registry, which
stays as it is."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dlbhooks as dlb
from dlbhooks.rules import registry
from dlbhooks.rules.registry import Rule, RuleOverlay
from tests.helpers import assert_conserved


class Doubler(nn.Module):
    def forward(self, x):  # through numpy: no torch function is recorded, so no rule, no luck
        return torch.from_numpy(x.numpy() * 2)


class Tripler(Doubler):
    def forward(self, x):
        return 3 * x


DOUBLER = f"{Doubler.__module__}.{Doubler.__qualname__}"


def scaled(value: float):
    """A rule passing on ``value`` of the relevance (a leaky one, to tell rules apart)."""

    def rule(record, relevance_out, ctx) -> dlb.RuleResult:
        return dlb.RuleResult([relevance_out[0] * value])

    rule.__name__ = f"scaled_{value}"
    return rule


@pytest.fixture
def global_registry():
    """The global registry's contents, checked unchanged after the test."""
    before = dict(registry._BY_TYPE), dict(registry._BY_NAME)
    yield
    assert (dict(registry._BY_TYPE), dict(registry._BY_NAME)) == before


def model_with(module: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), module).double()


X = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("key", [Doubler, DOUBLER], ids=["type", "dotted-name"])
def test_a_rule_for_one_trace_only(key, global_registry):
    model = model_with(Doubler())
    with pytest.raises(dlb.UnsupportedModuleError, match="Doubler"):
        dlb.explain(model, X)
    with dlb.trace(model, rules={key: scaled(1.0)}) as tape:
        model(X)
    exp = tape.explain()
    assert exp.total_input + exp.total_absorbed == pytest.approx(200.0, rel=1e-12)
    assert tape.explain(mode="contrastive").conservation_error() < 1e-12  # the tape keeps it
    assert registry.lookup(Doubler) is None
    with pytest.raises(dlb.UnsupportedModuleError, match="Doubler"):
        dlb.explain(model, X)  # another trace: no rule
    one_call = dlb.explain(model, X, rules={key: scaled(1.0)})
    assert torch.equal(one_call.inputs["input"], exp.inputs["input"])


def test_the_overlay_wins_over_the_global_rule_of_the_same_class(global_registry):
    model = model_with(nn.ReLU())
    plain = dlb.explain(model, X)
    halved = dlb.explain(model, X, rules={nn.ReLU: scaled(0.5)})
    assert halved.total_input == pytest.approx(plain.total_input / 2, rel=1e-12)
    assert registry.lookup(nn.ReLU).name == "passthrough"
    assert torch.equal(dlb.explain(model, X).inputs["input"], plain.inputs["input"])


def test_the_most_specific_class_wins_across_both(global_registry):
    model = model_with(Tripler())
    try:
        dlb.register_rule(Tripler, scaled(0.5))
        # global rule for the subclass beats the overlay's rule for the base class
        overlay = RuleOverlay({Doubler: scaled(0.25)})
        assert registry.lookup(Tripler, overlay).name == "scaled_0.5"
        assert registry.lookup(Doubler, overlay).name == "scaled_0.25"
        # at the same class the overlay comes first
        overlay = RuleOverlay({DOUBLER: scaled(0.25), Tripler: scaled(0.125)})
        assert registry.lookup(Tripler, overlay).name == "scaled_0.125"
        base = dlb.explain(model, X, rules={Tripler: scaled(1.0)})
        got = dlb.explain(model, X, rules={Doubler: scaled(0.25)})
        assert got.total_input == pytest.approx(base.total_input * 0.5, rel=1e-12)
    finally:
        dlb.unregister_rule(Tripler)
    # overlay for the subclass beats the global rule for the base class
    try:
        dlb.register_rule(Doubler, scaled(0.5))
        assert registry.lookup(Tripler, RuleOverlay({Tripler: scaled(0.25)})).name == \
            "scaled_0.25"
    finally:
        dlb.unregister_rule(Doubler)


def test_later_global_registrations_are_seen(global_registry):
    overlay = RuleOverlay({Doubler: scaled(1.0)})
    assert overlay.lookup(nn.Linear).name == registry.lookup(nn.Linear).name
    assert overlay.lookup(Tripler).name == "scaled_1.0"  # cached now
    try:
        dlb.register_rule(Tripler, scaled(0.5))
        assert overlay.lookup(Tripler).name == "scaled_0.5"
    finally:
        dlb.unregister_rule(Tripler)
    assert overlay.lookup(Tripler).name == "scaled_1.0"


def test_a_rule_returning_what_it_absorbed(global_registry):
    def keeps_a_quarter(record, relevance_out, ctx) -> dlb.RuleResult:
        R = relevance_out[0]
        return dlb.RuleResult([R * 0.75], R * 0.25)

    exp = dlb.explain(model_with(Doubler()), X, rules={Doubler: keeps_a_quarter})
    assert exp.absorbed["1"] == pytest.approx(50.0, rel=1e-12)  # a quarter of 2 × 100
    assert_conserved(exp)


def test_a_streamwise_rule_object_gets_one_stream_at_a_time(global_registry):
    seen = []

    def passthrough(record, relevance_out, ctx) -> dlb.RuleResult:
        seen.append(tuple(relevance_out[0].shape))
        return dlb.RuleResult([relevance_out[0]])

    rule = Rule(passthrough, "mine", streamwise=True)
    exp = dlb.explain(model_with(Doubler()), X, mode="contrastive", rules={Doubler: rule})
    assert seen == [(2, 4)] * 2  # one stream at a time, no leading axis
    assert exp.conservation_error() < 1e-12


class Residual(nn.Module):
    """``lin(x) + x`` written in place: the Linear's recorded output changes afterwards."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        y = self.lin(x)
        y += x
        return y


def residual_rule(record, relevance_out, ctx) -> dlb.RuleResult:
    lin = record.children[0]
    before = lin.output_value(0)  # the Linear's output before `+= x`: needs the snapshot
    assert torch.allclose(before + record.inputs[0], record.outputs[0])
    return dlb.RuleResult([relevance_out[0]])


def test_the_tracer_takes_the_snapshots_an_overlay_rule_asks_for(global_registry):
    model = Residual().double()
    exp = dlb.explain(model, X, rules={Residual: Rule(residual_rule, "residual",
                                                     snapshot=("lin",))})
    assert exp.total_input == pytest.approx(200.0, rel=1e-12)
    with pytest.raises(dlb.RecordModifiedError):
        dlb.explain(model, X, rules={Residual: residual_rule})  # no snapshot asked for


def test_composite_rules_look_rules_up_through_the_tape(global_registry):
    found = []

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Doubler()

        def forward(self, x):
            return self.inner(x)

    def outer_rule(record, relevance_out, ctx) -> dlb.RuleResult:
        found.append(ctx.lookup(Doubler))
        return dlb.RuleResult([relevance_out[0]])

    mine = Rule(scaled(1.0), "mine")
    dlb.explain(Outer().double(), X, rules={Outer: outer_rule, Doubler: mine})
    assert found == [mine]


def test_coverage_takes_the_same_rules(global_registry):
    model = model_with(Doubler())
    assert dlb.coverage(model).missing == ["1"]
    cov = dlb.coverage(model, rules={DOUBLER: scaled(1.0)})
    assert cov.complete and cov.rules["1"] == "scaled_1.0"


@pytest.mark.parametrize("rules, match", [
    ({1: scaled(1.0)}, "keys"), ({Doubler: 3}, "function"), ([(Doubler, scaled(1.0))], "mapping"),
])
def test_bad_rules_are_refused_at_trace_time(rules, match):
    with pytest.raises(TypeError, match=match):
        dlb.trace(model_with(Doubler()), rules=rules)


def test_no_rules_is_the_global_registry():
    assert RuleOverlay.of(None) is None and RuleOverlay.of({}) is None
    with dlb.trace(model_with(nn.ReLU())) as tape:
        pass
    assert tape.rules is None
