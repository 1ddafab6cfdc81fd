"""Runtime spec checks: a composite rule or the experts rule whose spec does not fit the
model raises a dlbhooks error naming the module, never explains silently or with a bare
torch error. Each wrong spec is registered for a subclass of a real tiny transformers
class (the real class keeps its rule), next to the right spec, which must explain."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import assert_conserved

import dlbhooks as dlb
from dlbhooks.errors import DLBError, UnsupportedModuleError
from dlbhooks.models.hf_families import ATTN
from dlbhooks.rules.functional import (
    Add,
    Arg,
    Functional,
    Gather,
    Heads,
    In,
    Mul,
    Out,
    Ret,
    Rope,
)
from dlbhooks.weights import weight_marks

t = pytest.importorskip("transformers")

IDS = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(1))
SMALL = dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=32)


def llama(cls=None, **kw):
    torch.manual_seed(0)
    cfg = t.LlamaConfig(**SMALL, intermediate_size=24, **kw)
    return (cls or t.LlamaForCausalLM)(cfg).double().eval()


def gpt_oss(experts_scale: float = 1.0, **kw):
    torch.manual_seed(0)
    cfg = t.GptOssConfig(**SMALL, head_dim=8, intermediate_size=8, num_local_experts=4,
                         num_experts_per_tok=2, sliding_window=4,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4}, **kw)
    model = t.AutoModelForCausalLM.from_config(cfg).double().eval()
    model.set_experts_implementation("eager")
    _scale_experts(model, experts_scale)
    return model


def mixtral(experts_scale: float = 1.0):
    torch.manual_seed(0)
    cfg = t.MixtralConfig(**SMALL, intermediate_size=8, num_local_experts=4,
                          num_experts_per_tok=2)
    model = t.AutoModelForCausalLM.from_config(cfg).double().eval()
    model.set_experts_implementation("eager")
    _scale_experts(model, experts_scale)
    return model


def _scale_experts(model, scale: float) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".experts." in n:
                p.mul_(scale)


@contextlib.contextmanager
def ruled(module, rule):
    """``module`` becomes an instance of a subclass of its class (same module name, so the
    attention recorder still finds the family's attention function) with ``rule``."""
    cls = type(module)
    sub = type(f"Spec{cls.__name__}", (cls,), {"__module__": cls.__module__})
    module.__class__ = sub
    dlb.register_rule(sub, rule, name="spec_under_test")
    try:
        yield
    finally:
        dlb.unregister_rule(sub)
        module.__class__ = cls


def _heads(src: str, which: int) -> Heads:
    return Heads(Out(src), In(ATTN, which))


RESIDUAL = Add(In("post_attention_layernorm"), (Arg(0), Out("self_attn")),
               names=("residual", "attention"))

# (family, module path, right spec, wrong spec, error type, what the message says)
CASES = {
    "add_terms": (
        llama, "model.layers.0",
        Functional(Add(Ret(0), (In("post_attention_layernorm"), Out("mlp"))), RESIDUAL),
        # the attention branch instead of the MLP's: the terms do not add up
        Functional(Add(Ret(0), (In("post_attention_layernorm"), Out("self_attn"))), RESIDUAL),
        DLBError, "do not add up"),
    "mul_factors": (
        llama, "model.layers.0.mlp",
        Functional(Mul(In("down_proj"), (Out("act_fn"), Out("up_proj")))),
        # act(gate) * gate: the product is not what down_proj read
        Functional(Mul(In("down_proj"), (Out("act_fn"), Out("gate_proj")))),
        DLBError, "do not multiply"),
    "mul_locator": (
        llama, "model.layers.0.mlp",
        Functional(Mul(In("down_proj"), (Out("act_fn"), Out("up_proj")))),
        Functional(Mul(In("down_proj"), (Out("act"), Out("up_proj")))),  # no child "act"
        UnsupportedModuleError, "could not find"),
    "rope_half_cos_on_llama": (
        llama, "model.layers.0.self_attn",
        Functional(Rope(In(ATTN, 0), _heads("q_proj", 0)), Rope(In(ATTN, 1), _heads("k_proj", 1))),
        # GPT-OSS's one-cos-per-pair on a family whose cos is already full width
        Functional(Rope(In(ATTN, 0), _heads("q_proj", 0), half_cos=True),
                   Rope(In(ATTN, 1), _heads("k_proj", 1), half_cos=True)),
        DLBError, "do not fit"),
    "rope_full_cos_on_gpt_oss": (
        gpt_oss, "model.layers.0.self_attn",
        Functional(Rope(In(ATTN, 0), _heads("q_proj", 0), half_cos=True),
                   Rope(In(ATTN, 1), _heads("k_proj", 1), half_cos=True)),
        Functional(Rope(In(ATTN, 0), _heads("q_proj", 0)), Rope(In(ATTN, 1), _heads("k_proj", 1))),
        DLBError, "re-applying RoPE"),
    "rope_q_from_k": (
        llama, "model.layers.0.self_attn",
        Functional(Rope(In(ATTN, 0), _heads("q_proj", 0)), Rope(In(ATTN, 1), _heads("k_proj", 1))),
        Functional(Rope(In(ATTN, 0), _heads("k_proj", 1)), Rope(In(ATTN, 1), _heads("q_proj", 0))),
        DLBError, "re-applying RoPE"),
    "gather_not_a_slice": (  # num_labels == hidden: same shapes, other values
        lambda: llama(t.LlamaForSequenceClassification, num_labels=16, pad_token_id=0), "",
        Functional(Gather(Ret("logits"), Out("score"), dim=1)),
        Functional(Gather(Ret("logits"), In("score"), dim=1)),
        DLBError, "not a slice"),
    "gather_wrong_dim": (
        lambda: llama(t.LlamaForSequenceClassification, num_labels=3, pad_token_id=0), "",
        Functional(Gather(Ret("logits"), Out("score"), dim=1)),
        Functional(Gather(Ret("logits"), Out("score"), dim=2)),
        DLBError, "not a slice"),
    "gather_not_pooled": (  # a causal LM's logits are the whole head output, no slice
        llama, "",
        None,
        Functional(Gather(Ret("logits"), Out("lm_head"), dim=1)),
        DLBError, "not a slice"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_wrong_functional_spec_raises(case):
    build, path, right, wrong, error, says = CASES[case]
    model = build()
    module = model.get_submodule(path)
    name = f"'{path or '<root>'}' ({type(module).__module__}.Spec{type(module).__name__})"
    if right is not None:  # the control: the same machinery with the right spec explains
        with ruled(module, right):
            assert_conserved(dlb.explain(model, {"input_ids": IDS}), rtol=1e-12)
    with ruled(module, wrong), pytest.raises(error) as info:
        dlb.explain(model, {"input_ids": IDS})
    assert info.type is error
    assert name in str(info.value) and says in str(info.value)


# -- the experts rule's recomputation check -----------------------------------------------

EXPERTS = "model.layers.0.mlp.experts"


def _explain_after(model, change) -> None:
    """Record a forward, then ``change`` the model, then explain the recorded forward."""
    with dlb.trace(model) as tape:
        model(input_ids=IDS)
    change(model.get_submodule(EXPERTS))
    # past the tape's guard against changed weights (a RecordModifiedError of its own): this
    # tests the experts rule's check that its recomputation fits the recorded forward
    tape.weight_marks = weight_marks(model)
    tape.explain()


def _swap_gate_up(experts) -> None:
    with torch.no_grad():
        gate, up = experts.gate_up_proj.data.chunk(2, dim=1)
        experts.gate_up_proj.data = torch.cat((up, gate), dim=1)


def _gelu(experts) -> None:
    experts.act_fn = torch.nn.GELU()


def _limit(experts) -> None:
    experts.limit = 0.5


def _alpha(experts) -> None:
    experts.alpha = 1.0


def _transposed(experts) -> None:  # GPT-OSS's [E, H, 2I] layout on a Mixtral
    experts.gate_up_proj.data = experts.gate_up_proj.data.transpose(1, 2).contiguous()
    experts.down_proj.data = experts.down_proj.data.transpose(1, 2).contiguous()


@pytest.mark.parametrize("build,change", [
    (mixtral, _gelu), (mixtral, _swap_gate_up), (mixtral, _transposed),
    (gpt_oss, _limit), (gpt_oss, _alpha),
], ids=["mixtral-activation", "mixtral-gate_up_order", "mixtral-layout", "gpt_oss-limit",
        "gpt_oss-alpha"])
def test_experts_recomputation_check(build, change):
    model = build(experts_scale=8.0)  # experts' outputs well above rounding
    _explain_after(model, lambda e: None)  # the control: unchanged, it explains
    with pytest.raises(DLBError) as info:
        _explain_after(model, change)
    assert info.type is DLBError
    assert f"'{EXPERTS}'" in str(info.value) and "experts rule" in str(info.value)


def test_experts_with_other_gating_raise():
    """A subclass of a supported experts class whose gating differs (here GPT-OSS without
    its ``+1`` on up) gets the parent's rule, whose recomputation then does not fit."""
    model = gpt_oss(experts_scale=8.0)
    experts = model.get_submodule(EXPERTS)
    cls = type(experts)

    def apply_gate(self, gate_up):
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(max=self.limit)
        return up.clamp(-self.limit, self.limit) * gate * torch.sigmoid(gate * self.alpha)

    experts.__class__ = type("NoPlusOneExperts", (cls,), {"_apply_gate": apply_gate})
    try:
        with dlb.trace(model) as tape:
            model(input_ids=IDS)
        with pytest.raises(DLBError, match="does not give the module's output") as info:
            tape.explain()
        assert f"'{EXPERTS}'" in str(info.value) and "NoPlusOneExperts" in str(info.value)
    finally:
        experts.__class__ = cls


@pytest.mark.parametrize("layout,says", [
    ("GPT_OSS", "no tensor ['gate_up_proj_bias', 'down_proj_bias']"),  # Mixtral has none
    ("NO_BIAS", "do not have the layout"),  # transposed: [E, 2I, H] read as [E, H, 2I]
    ("INTERLEAVED", "does not give the module's output"),  # gate/up read interleaved
], ids=["gpt_oss", "transposed", "interleaved"])
def test_experts_rule_registered_for_the_wrong_layout_raises(layout, says):
    """Another family's experts layout registered for Mixtral's experts: an error naming
    the module and what does not fit, not a torch error or a silent explanation."""
    from dlbhooks.rules.experts import GPT_OSS, ExpertsLayout, experts_rule_for

    layouts = {"GPT_OSS": GPT_OSS, "NO_BIAS": ExpertsLayout(transposed=True),
               "INTERLEAVED": ExpertsLayout(interleaved=True)}
    model = mixtral(experts_scale=8.0)
    with ruled(model.get_submodule(EXPERTS), experts_rule_for(layouts[layout])), \
            pytest.raises(DLBError) as info:
        dlb.explain(model, {"input_ids": IDS})
    assert info.type is DLBError
    assert f"'{EXPERTS}'" in str(info.value) and says in str(info.value)


# -- the checks do not fire on right specs in low precision --------------------------------


@pytest.mark.parametrize("dtype,storage,rtol", [(torch.float32, "bf16", 1e-6),
                                                (torch.bfloat16, None, 2e-2)],
                         ids=["bf16_records", "bf16_forward"])
def test_checks_allow_low_precision(dtype, storage, rtol):
    """Qwen2-MoE (experts + gated shared expert, both checked) with large expert weights:
    records stored in bf16, or a bf16 forward, differ from float recomputation by more
    than 1e-3; the checks' tolerance follows the records' precision. (Conservation
    measured: 1e-8 with bf16 records, 5e-3 in a bf16 forward.)"""
    torch.manual_seed(0)
    cfg = t.Qwen2MoeConfig(**SMALL, intermediate_size=16, moe_intermediate_size=8,
                           shared_expert_intermediate_size=8, num_experts=4,
                           num_experts_per_tok=2)
    model = t.AutoModelForCausalLM.from_config(cfg).eval()
    model.set_experts_implementation("eager")
    _scale_experts(model, 10.0)
    model = model.to(dtype)
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(5))
    with dlb.trace(model, **({"storage": storage} if storage else {})) as tape:
        model(input_ids=ids)
    assert_conserved(tape.explain(), rtol=rtol)
