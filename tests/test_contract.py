"""The rule contract (dlbhooks/rules/contract.py): stacked relevance, RuleResult, the
adapter for rules of the first form, and that every built-in rule is written to it."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dlbhooks as dlb
from dlbhooks.relevance import Streams, rsum, stack
from dlbhooks.rules import registry
from dlbhooks.rules.composite import add_split
from dlbhooks.rules.contract import RuleResult, is_stacked_form, stacked_rule
from dlbhooks.rules.elementwise import add_rule

D = torch.float64


class Scale(nn.Module):
    def forward(self, x):
        return 2 * x


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x):
        return self.body(x) + x


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Residual(), Scale(), nn.Linear(4, 3)).double()


X = torch.randn(5, 4, dtype=D, generator=torch.Generator().manual_seed(1))


# -- the new form -------------------------------------------------------------------------


def scale_new(record, relevance_out, ctx) -> RuleResult:
    R = relevance_out[0]
    return RuleResult([R * 0.75], R * 0.25)  # a quarter absorbed, summed per stream


def residual_new(record, relevance_out, ctx) -> RuleResult:
    body = record.child("body")
    (r_body, r_skip), lost = add_split(relevance_out[0], [body.output_value(0),
                                                          record.input_value(0)])
    bag = ctx.new_bag(record)
    bag.add(body.outputs[0], r_body)
    ctx.walk(record.children, bag)
    bag.add(record.inputs[0], r_skip)
    return RuleResult(ctx.collect(record, bag), lost)


# -- the same rules in the first form: tensors without the axis, Streams in contrastive --


def scale_old(record, relevance_out, ctx):
    R = relevance_out[0]
    if isinstance(R, Streams):
        return [Streams(R.pos * 0.75, R.neg * 0.75)], Streams(R.pos.sum() * 0.25,
                                                               R.neg.sum() * 0.25)
    return [R * 0.75], R.sum() * 0.25


def residual_old(record, relevance_out, ctx):
    body = record.child("body")
    terms = [body.output_value(0), record.input_value(0)]
    R = relevance_out[0]
    if isinstance(R, Streams):
        (bp, sp), lp = add_rule(R.pos, terms)
        (bn, sn), ln = add_rule(R.neg, terms)
        r_body, r_skip, lost = Streams(bp, bn), Streams(sp, sn), Streams(lp, ln)
    else:
        (r_body, r_skip), lost = add_rule(R, terms)
    bag = ctx.new_bag(record)
    bag.add(body.outputs[0], r_body)
    ctx.walk(record.children, bag)
    bag.add(record.inputs[0], r_skip)
    return ctx.collect(record, bag), lost


def _explain(rules, mode):
    model = _model()
    with dlb.trace(model, rules=rules) as tape:
        model(X)
    return tape.explain(mode=mode)


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_rules_of_the_first_form_run_through_the_adapter_and_agree(mode):
    new = _explain({Scale: scale_new, Residual: residual_new}, mode)
    with pytest.warns(DeprecationWarning) as warned:
        old = _explain({Scale: scale_old, Residual: residual_old}, mode)
    assert sorted(str(w.message).split("'")[1] for w in warned) == ["residual_old", "scale_old"]
    assert all("first rule form" in str(w.message) for w in warned)
    assert new.conservation_error() < 1e-12 * 100
    for a, b in ((new.inputs, old.inputs), (new.positive or {}, old.positive or {}),
                 (new.negative or {}, old.negative or {})):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert new.absorbed == old.absorbed and len(new.absorbed) > 0
    assert [e.relevance_in for e in new.ledger] == [e.relevance_in for e in old.ledger]
    # the rule's quarter is absorbed: the ledger says so, per stream
    q = new.ledger[[e.key for e in new.ledger].index("1")]
    if mode == "contrastive":
        assert q.absorbed == pytest.approx((q.relevance_out[0] / 4, q.relevance_out[1] / 4))
    else:
        assert q.absorbed == pytest.approx(q.relevance_out / 4, rel=1e-14)


def test_a_streamwise_rule_is_written_for_one_tensor():
    def scale_one(record, relevance_out, ctx) -> RuleResult:
        R = relevance_out[0]
        assert R.shape == record.outputs[0].shape  # no leading axis
        return RuleResult([R * 0.75], R.sum() * 0.25)

    for mode in ("default", "contrastive"):
        new = _explain({Scale: scale_new, Residual: residual_new}, mode)
        one = _explain({Scale: registry.Rule(scale_one, "scale_one", streamwise=True),
                        Residual: residual_new}, mode)
        assert torch.equal(new.inputs["input"], one.inputs["input"])
        assert new.absorbed == one.absorbed


def test_a_rule_annotated_for_the_contract_must_return_a_rule_result():
    def wrong(record, relevance_out, ctx) -> RuleResult:
        return [relevance_out[0]]  # type: ignore[return-value]

    with pytest.raises(TypeError, match=r"'wrong' for '1' \(test_contract.Scale\) returned list"):
        _explain({Scale: wrong, Residual: residual_new}, "default")


def test_absorbed_needs_the_stream_axis():
    def scalar(record, relevance_out, ctx) -> RuleResult:
        R = relevance_out[0]
        return RuleResult([R * 0.5], (R * 0.5).sum())  # a 0-d total: which stream?

    with pytest.raises(ValueError, match="leading stream axis"):
        _explain({Scale: scalar, Residual: residual_new}, "default")


def test_the_form_is_told_by_annotation_or_mark():
    def annotated(record, relevance_out, ctx) -> RuleResult: ...

    def plain(record, relevance_out, ctx): ...

    class Composite:
        def __call__(self, record, relevance_out, ctx) -> dlb.RuleResult: ...

    assert is_stacked_form(annotated) and is_stacked_form(Composite())
    assert not is_stacked_form(plain) and not is_stacked_form(lambda r, R, c: [R[0]])
    assert is_stacked_form(stacked_rule(lambda r, R, c: RuleResult([R[0]])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new form registers without a warning
        registry.Rule(annotated, "annotated")
    with pytest.warns(DeprecationWarning, match="'plain'"):
        registry.Rule(plain, "plain")


def test_every_built_in_rule_is_written_to_the_contract():
    import dlbhooks.models.hf_families  # noqa: F401  (registers the families)
    import dlbhooks.models.torchvision_cnn  # noqa: F401
    import dlbhooks.models.torchvision_vit  # noqa: F401

    rules = {**{registry._qualname(c): r for c, r in registry._BY_TYPE.items()},
             **registry._BY_NAME}
    assert len(rules) > 60
    legacy = [name for name, r in rules.items() if not r.stacked]
    assert legacy == []


def test_stack_keeps_each_part_s_layout_so_totals_stay_bitwise():
    g = torch.Generator().manual_seed(2)
    base = torch.rand(3, 5, 7, dtype=torch.float32, generator=g)
    p, n = base.transpose(1, 2), (base * 1.5).transpose(1, 2)  # non-contiguous parts
    s = stack([p, n])
    assert s.shape == (2, 3, 7, 5) and s[0].stride() == p.stride()
    assert torch.equal(s[0], p) and torch.equal(s[1], n)
    assert torch.equal(rsum(s), torch.stack([p.sum().double(), n.sum().double()]))
    one = stack([p])
    assert one.data_ptr() == p.data_ptr() and one.shape == (1, 3, 7, 5)  # a view: no copy
