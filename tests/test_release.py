"""Memory of the records: a dropped tape frees them at once; ``release=True`` (what
``dlb.explain`` does) frees them behind the reverse walk, with the same results."""

import gc
import weakref

import pytest
import torch
import transformers
from torch import nn

import dlbhooks as dlb


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=24, intermediate_size=40,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double().eval()


IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


def watch_outputs(model: nn.Module) -> tuple[list, list]:
    """Weak references to every module output of the next forward, and the hook handles."""
    refs: list = []

    def hook(module, args, out):
        for t in (out,) if isinstance(out, torch.Tensor) else getattr(out, "values", lambda: ())():
            if isinstance(t, torch.Tensor):
                refs.append(weakref.ref(t))

    return refs, [m.register_forward_hook(hook) for m in model.modules()]


@pytest.fixture
def no_cycle_collector():
    """Python's cycle collector off: what is freed, is freed by reference counting."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_dropped_tape_frees_its_records_without_the_cycle_collector(no_cycle_collector):
    """Records point at their parents and children; a tape dropped in a loop of
    explanations used to keep every recorded tensor until the cycle collector ran
    (gigabytes per tape at 2,048 tokens)."""
    model = tiny_llama()
    refs, handles = watch_outputs(model)
    with dlb.trace(model) as tape:
        model(input_ids=IDS)
    for h in handles:
        h.remove()
    assert len(refs) > 20 and all(r() is not None for r in refs)
    tape.explain(target=3, keep=False)
    del tape
    assert [r for r in refs if r() is not None] == []


def test_dlb_explain_keeps_no_recorded_tensor_alive(no_cycle_collector):
    """The one-call API's tape goes when it returns: the explanation holds relevance only."""
    model = tiny_llama()
    refs, handles = watch_outputs(model)
    exp = dlb.explain(model, {"input_ids": IDS}, target=3)
    for h in handles:
        h.remove()
    assert len(refs) > 20
    assert [r for r in refs if r() is not None] == []
    assert exp.inputs["input_ids"].shape == (2, 9)
