"""Documented features a new user hits first: each test here failed before its fix."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_conserved, tiny_llama
from torch import nn

import dlbhooks as dlb
from dlbhooks.rules import registry


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 3)).double().eval()
    return model, torch.randn(4, 5, dtype=torch.float64)


def _same(a: dlb.Explanation, b: dlb.Explanation) -> None:
    assert a.inputs.keys() == b.inputs.keys()
    for k in a.inputs:
        assert torch.equal(a.inputs[k], b.inputs[k]), k
    assert a.layers == b.layers and a.absorbed == b.absorbed


# -- grad=True ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_grad_true_explains_like_no_grad(mode):
    model, x = _mlp()
    with dlb.trace(model, grad=True) as tape:
        out = model(x)
    assert out.requires_grad  # the forward kept autograd, as asked
    exp = tape.explain(mode=mode)
    assert not exp.inputs["input"].requires_grad
    _same(exp, dlb.explain(model, x, mode=mode))
    out.sum().backward()  # the user's graph is intact after explaining
    assert model[0].weight.grad is not None


# -- inference mode and torch.compile ------------------------------------------------------

def test_explain_inside_inference_mode_equals_outside():
    model, x = _mlp()
    ref = dlb.explain(model, x)
    with torch.inference_mode():
        xi = x.clone()  # an inference tensor, as users' inputs there are
        exp = dlb.explain(model, xi)
        assert torch.is_inference_mode_enabled()  # restored inside the user's block
    _same(exp, ref)


def test_inference_mode_inside_the_trace_block_is_a_clear_error():
    model, x = _mlp()
    with pytest.raises(dlb.TraceError, match="inference_mode"):
        with dlb.trace(model):
            with torch.inference_mode():
                model(x)
    assert not model._forward_pre_hooks and not model[0]._forward_hooks


@pytest.mark.parametrize("how", ["torch.compile", "module.compile", "submodule"])
def test_compiled_model_runs_eagerly_and_explains_like_the_original(how):
    model, x = _mlp()
    ref = dlb.explain(model, x)
    if how == "torch.compile":
        compiled = torch.compile(model)
    elif how == "module.compile":
        compiled = _mlp()[0]
        compiled.compile()
    else:  # one layer compiled in place
        compiled = _mlp()[0]
        compiled[2].compile()
    with dlb.trace(compiled) as tape:
        compiled(x)
    exp = tape.explain()
    _same(exp, ref)  # same paths ("0", "2", ...: no "_orig_mod." prefix) and values
    assert len(tape.records) == 6
    stance = getattr(torch._dynamo.eval_frame, "_stance", None)
    if stance is not None:  # the stance is back to what it was
        assert stance.stance == "default"


# -- saved contrastive explanations ----------------------------------------------------------

def test_loaded_contrastive_explanation_checks_conservation(tmp_path):
    model, x = _mlp()
    exp = dlb.explain(model, x, mode="contrastive")
    exp.save(tmp_path / "e.safetensors")
    back = dlb.Explanation.load(tmp_path / "e.safetensors")
    assert back.conservation_error() == exp.conservation_error() < 1e-12
    assert back.ledger == exp.ledger  # pairs come back as pairs
    assert back.absorbed_positive == exp.absorbed_positive
    assert back.absorbed_negative == exp.absorbed_negative


# -- per-stream absorbed ----------------------------------------------------------------------

def test_contrastive_absorbed_per_stream_and_the_identity():
    torch.manual_seed(1)  # a LayerNorm's beta absorbs in both streams (linear biases do not)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    nn.init.normal_(model[1].bias)
    model = model.double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    exp = dlb.explain(model, x, mode="contrastive", multiplier=10.0)
    assert_conserved(exp)
    rows = x.shape[0]
    assert exp.absorbed_positive.keys() == exp.absorbed.keys() == exp.absorbed_negative.keys()
    for k, v in exp.absorbed.items():
        assert v == exp.absorbed_positive[k] - exp.absorbed_negative[k]
    # per stream: inputs + absorbed = multiplier x rows (to float64 rounding)
    for inputs, absorbed in ((exp.positive, exp.absorbed_positive),
                             (exp.negative, exp.absorbed_negative)):
        total = sum(float(t.sum()) for t in inputs.values()) + sum(absorbed.values())
        assert abs(total - 10.0 * rows) <= 1e-12 * 10.0 * rows
    assert exp.absorbed_positive["1"] > 0 and exp.absorbed_negative["1"] > 0
    assert exp.absorbed_positive["0"] == exp.absorbed_negative["0"] == 0.0  # §2: no bias sink
    default = dlb.explain(model, x)
    assert default.absorbed_positive is None and default.absorbed_negative is None


# -- rules registered by name -----------------------------------------------------------------

class Doubler(nn.Module):
    def forward(self, x):  # through numpy: no torch function is recorded, so no rule, no luck
        return torch.from_numpy(x.numpy() * 2)


def _rule(value: float):
    def rule(record, relevance_out, ctx) -> dlb.RuleResult:
        # a deliberately leaky rule, to tell rules apart
        return dlb.RuleResult([relevance_out[0] * value])
    return rule


def test_rule_registered_by_name_can_be_replaced_and_removed():
    name = f"{Doubler.__module__}.{Doubler.__qualname__}"
    model = nn.Sequential(nn.Linear(3, 3), Doubler()).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    try:
        dlb.register_rule(name, _rule(1.0))
        first = dlb.explain(model, x)
        dlb.register_rule(name, _rule(0.5))  # replaced after a lookup cached the first
        assert dlb.explain(model, x).total_input == pytest.approx(first.total_input / 2,
                                                                  rel=1e-12)
        dlb.unregister_rule(name)  # removed after a lookup: no rule any more
        assert registry.lookup(Doubler) is None
        with pytest.raises(dlb.UnsupportedModuleError, match="Doubler"):
            dlb.explain(model, x)
        # by class, then by name: the name replaces it; unregistering the class removes both
        dlb.register_rule(Doubler, _rule(1.0))
        assert dlb.explain(model, x).total_input == pytest.approx(first.total_input, rel=1e-12)
        dlb.register_rule(name, _rule(0.25))
        assert dlb.explain(model, x).total_input == pytest.approx(first.total_input / 4,
                                                                  rel=1e-12)
        dlb.register_rule(Doubler, _rule(0.5))
        assert dlb.explain(model, x).total_input == pytest.approx(first.total_input / 2,
                                                                  rel=1e-12)
        dlb.unregister_rule(Doubler)
        assert registry.lookup(Doubler) is None
        dlb.register_rule(name, _rule(1.0))
        dlb.unregister_rule(Doubler)  # a name registration goes with its class too
        assert registry.lookup(Doubler) is None
    finally:
        dlb.unregister_rule(name)


# -- padded batches on causal LMs -------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_right_padding_explains_each_rows_last_real_token(llama, mode):
    ids = torch.randint(1, 40, (3, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    ids[mask == 0] = 0
    exp = dlb.explain(llama, {"input_ids": ids, "attention_mask": mask}, mode=mode)
    assert exp.info["position"] == [5, 3, 1]
    assert_conserved(exp)
    assert torch.all(exp.inputs["input_ids"][mask == 0] == 0)  # pads get exactly 0
    for row, n in ((1, 4), (2, 2)):  # equal to that row alone, unpadded
        alone = dlb.explain(llama, {"input_ids": ids[row:row + 1, :n]}, mode=mode)
        assert alone.target == [exp.target[row]]
        torch.testing.assert_close(exp.inputs["input_ids"][row, :n], alone.inputs["input_ids"][0],
                                   rtol=0, atol=1e-12)  # measured 9e-16


def test_position_on_padding_is_a_target_error(llama):
    ids = torch.randint(1, 40, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    with dlb.trace(llama) as tape:
        llama(**inputs)
    with pytest.raises(dlb.TargetError, match=r"padding in rows \[0\]"):
        tape.explain(position=-1)
    with pytest.raises(dlb.TargetError, match="padding"):
        tape.explain(position=[4, 4])
    exp = tape.explain(position=[2, 4])  # explicit positions on real tokens are fine
    assert exp.info["position"] == [2, 4]
    mask[1] = 0
    with dlb.trace(llama) as tape:
        llama(input_ids=ids, attention_mask=mask)
    with pytest.raises(dlb.TargetError, match="no real token"):
        tape.explain()


def test_left_padding_keeps_the_last_position(llama):
    ids = torch.randint(1, 40, (2, 5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    exp = dlb.explain(llama, {"input_ids": ids, "attention_mask": mask})
    assert exp.info["position"] == [4, 4]
    assert torch.all(exp.inputs["input_ids"][0, :2] == 0)
