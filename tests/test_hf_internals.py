"""The private transformers (and accelerate) internals dlbhooks relies on: each is pinned
against the installed version, so that a release that changes one fails here, by name,
instead of silently changing explanations; each guard raises a clear error when its
internal is taken away."""

from __future__ import annotations

import re
from pathlib import Path

import accelerate
import pytest
import torch
import transformers
from accelerate import hooks
from packaging.requirements import Requirement
from packaging.version import Version
from torch import nn
from transformers import PreTrainedConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
from transformers.utils import output_capturing

import dlbhooks as dlb
from dlbhooks.models import hf_attention
from dlbhooks.models.hf_internals import (
    TESTED_VERSION,
    TransformersInternalError,
    collected_outputs,
    get_attn_implementation,
    set_attn_implementation,
    upcast_attention,
)

CHANGED = (f"transformers {transformers.__version__} changed an internal dlbhooks relies on "
           f"(written against {TESTED_VERSION}); update dlbhooks/models/hf_internals.py")


def tiny_llama(**cfg):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, **cfg)
    return transformers.LlamaForCausalLM(config).double().eval()


IDS = torch.tensor([[3, 5, 7, 9]])


# -- the versions the dependency allows ------------------------------------------------


def _requirement(name: str) -> Requirement:
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
    for line in re.findall(r'"([^"]+)"', deps):
        req = Requirement(line)
        if req.name == name:
            return req
    raise AssertionError(f"{name} is not in pyproject.toml's dependencies")


@pytest.mark.parametrize("name, module", [("transformers", transformers),
                                          ("accelerate", accelerate)])
def test_installed_version_is_within_the_tested_bounds(name, module):
    req = _requirement(name)
    upper = [s for s in req.specifier if s.operator == "<"]
    assert upper, f"pyproject.toml: {name} needs an upper bound (its internals are used)"
    assert Version(module.__version__) in req.specifier, (
        f"installed {name} {module.__version__} is outside pyproject.toml's {req}: "
        "check the internals in dlbhooks/models/hf_internals.py before widening the bound")


def test_tested_version_is_within_the_bound():
    assert Version(TESTED_VERSION) in _requirement("transformers").specifier


# -- config._attn_implementation_internal -----------------------------------------------


def test_attn_implementation_internal_is_what_models_read():
    prop = PreTrainedConfig.__dict__.get("_attn_implementation")
    assert isinstance(prop, property), f"{CHANGED}: PreTrainedConfig._attn_implementation"
    cfg = transformers.LlamaConfig()
    assert "_attn_implementation_internal" in vars(cfg), \
        f"{CHANGED}: config._attn_implementation_internal"
    for value in ("eager", "sdpa", None):
        set_attn_implementation(cfg, value)
        assert cfg._attn_implementation == value == get_attn_implementation(cfg), CHANGED


def test_set_attn_implementation_does_not_recurse_into_sub_configs():
    cfg = transformers.Gemma3Config()
    set_attn_implementation(cfg, "sdpa")
    set_attn_implementation(cfg.text_config, "eager")
    set_attn_implementation(cfg, "flex_attention")
    assert get_attn_implementation(cfg.text_config) == "eager"
    assert get_attn_implementation(cfg) == "flex_attention"


def test_attn_guard_without_the_property(monkeypatch):
    cfg = transformers.LlamaConfig()
    monkeypatch.delattr(PreTrainedConfig, "_attn_implementation")
    for call in (lambda: get_attn_implementation(cfg), lambda: set_attn_implementation(cfg, "x")):
        with pytest.raises(TransformersInternalError, match=r"_attn_implementation_internal.*"
                           + re.escape(transformers.__version__)):
            call()


def test_attn_guard_without_the_internal():
    cfg = transformers.LlamaConfig()
    del cfg.__dict__["_attn_implementation_internal"]
    with pytest.raises(TransformersInternalError, match="_attn_implementation_internal is missing"):
        get_attn_implementation(cfg)


def test_attn_guard_when_the_property_reads_elsewhere(monkeypatch):
    cfg = transformers.LlamaConfig(attn_implementation="eager")
    monkeypatch.setattr(PreTrainedConfig, "_attn_implementation", property(lambda self: "sdpa"))
    with pytest.raises(TransformersInternalError, match="no longer what"):
        get_attn_implementation(cfg)
    with pytest.raises(TransformersInternalError, match="no longer sets"):
        set_attn_implementation(cfg, "eager")


def test_trace_fails_loudly_and_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_llama()
    before = (model.config._attn_implementation_internal, model.config.use_cache)
    monkeypatch.setattr(PreTrainedConfig, "_attn_implementation", property(lambda self: "sdpa"))
    with pytest.raises(TransformersInternalError, match="_attn_implementation_internal"):
        with dlb.trace(model):
            pass
    assert (model.config._attn_implementation_internal, model.config.use_cache) == before


# -- transformers.utils.output_capturing._active_collector ------------------------------


def test_active_collector_is_a_context_variable():
    var = getattr(output_capturing, "_active_collector", None)
    assert var is not None and callable(getattr(var, "get", None)), \
        f"{CHANGED}: transformers.utils.output_capturing._active_collector"
    assert var.get() is None and collected_outputs() is None  # outside any forward


@pytest.mark.parametrize("kwargs, attentions", [({}, False), ({"output_attentions": True}, True),
                                                ({"output_hidden_states": True}, False)])
def test_collector_says_whether_attentions_are_collected(monkeypatch, kwargs, attentions):
    seen = []

    def spy():
        value = collected_outputs()
        seen.append(None if value is None else set(value))
        return value

    monkeypatch.setattr(hf_attention, "collected_outputs", spy)
    model = tiny_llama()
    with dlb.trace(model):
        out = model(IDS, **kwargs)
    assert len(seen) == 2 and all(s is not None for s in seen), f"{CHANGED}: {seen}"
    assert all(("attentions" in s) == attentions for s in seen), f"{CHANGED}: {seen}"
    assert (out.attentions is not None) == attentions
    if attentions:
        assert all(a is not None and a.shape == (1, 2, 4, 4) for a in out.attentions)


def test_collector_from_the_config_too(monkeypatch):
    model = tiny_llama(attn_implementation="eager", output_attentions=True)
    with dlb.trace(model):
        out = model(IDS)
    assert out.attentions is not None and all(a is not None for a in out.attentions), CHANGED


def test_collector_guard_when_missing(monkeypatch):
    monkeypatch.delattr(output_capturing, "_active_collector")
    with pytest.raises(TransformersInternalError,
                       match=r"output_capturing\._active_collector is missing.*"
                       + re.escape(transformers.__version__)):
        collected_outputs()


class ListCollector:
    """An output collector of another shape (a list of keys, not a dict of lists)."""

    def get(self):
        return ["attentions"]

    def set(self, value):
        return None

    def reset(self, token):
        pass


def test_collector_guard_when_it_holds_something_else(monkeypatch):
    monkeypatch.setattr(output_capturing, "_active_collector", ListCollector())
    with pytest.raises(TransformersInternalError, match="returned a list"):
        collected_outputs()


def test_collector_guard_inside_a_traced_forward(monkeypatch):
    monkeypatch.setattr(output_capturing, "_active_collector", ListCollector())
    model = tiny_llama()
    with pytest.raises(TransformersInternalError, match="_active_collector"):
        with dlb.trace(model):
            model(IDS)


# -- GPT-2's _upcast_and_reordered_attn ---------------------------------------------------


def _gpt2_attention(upcast: bool) -> GPT2Attention:
    cfg = transformers.GPT2Config(n_embd=16, n_head=2, reorder_and_upcast_attn=upcast)
    return GPT2Attention(cfg, layer_idx=0)


def test_gpt2_upcast_attention_is_a_method():
    attn = _gpt2_attention(True)
    fn = upcast_attention(attn)
    assert callable(fn) and fn.__func__ is GPT2Attention.__dict__.get(
        "_upcast_and_reordered_attn"), f"{CHANGED}: GPT2Attention._upcast_and_reordered_attn"
    assert upcast_attention(_gpt2_attention(False)) is None
    q = k = v = torch.randn(1, 2, 3, 8)
    out, weights = fn(q, k, v, None)
    assert out.shape == (1, 3, 2, 8) and weights.shape == (1, 2, 3, 3), CHANGED


def test_gpt2_upcast_guard_when_missing(monkeypatch):
    monkeypatch.delattr(GPT2Attention, "_upcast_and_reordered_attn")
    assert upcast_attention(_gpt2_attention(False)) is None  # not asked for: no error
    with pytest.raises(TransformersInternalError,
                       match=r"GPT2Attention\._upcast_and_reordered_attn is missing"):
        upcast_attention(_gpt2_attention(True))


# -- registration: public API ----------------------------------------------------------------


def test_registration_reaches_the_dispatch_tables():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    hf_attention._ensure_registered()
    assert ALL_ATTENTION_FUNCTIONS.get(hf_attention.NAME) is hf_attention.dlbhooks_attention
    assert ALL_MASK_ATTENTION_FUNCTIONS.get(hf_attention.NAME) is eager_mask
    assert hf_attention.NAME in ALL_ATTENTION_FUNCTIONS.valid_keys()


def test_registration_fails_loudly_when_overridden_locally():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS[hf_attention.NAME] = lambda *a, **k: None  # a local override
    try:
        with pytest.raises(TransformersInternalError, match="AttentionInterface.register"):
            hf_attention._ensure_registered()
    finally:
        del ALL_ATTENTION_FUNCTIONS[hf_attention.NAME]


# -- accelerate's _hf_hook (read in dlbhooks/integrations/accelerate.py and trace.py) -------


def test_accelerate_sets_hf_hook_on_the_module():
    layer = nn.Linear(2, 2)
    hook = hooks.ModelHook()
    hooks.add_hook_to_module(layer, hook)
    assert layer.__dict__.get("_hf_hook") is hook, (
        "accelerate no longer keeps its hook in module._hf_hook, which "
        "dlbhooks/integrations/accelerate.py and dlbhooks/trace.py read")
    hooks.remove_hook_from_module(layer)
    assert "_hf_hook" not in layer.__dict__
