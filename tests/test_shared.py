"""Several targets on one recorded forward share the forward-only denominators
(``tape.explain(share=True)``) and give exactly the relevance of unshared explanations."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import dlbhooks as dlb


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 5)).double().eval()


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_shared_denominators_give_identical_relevance(mode):
    model = _mlp()
    x = 3 * torch.randn(4, 6, dtype=torch.float64)  # large inputs: Tanh saturates
    with dlb.trace(model) as tape:
        model(x)
    plain = [tape.explain(target=t, mode=mode) for t in range(3)]
    assert not tape.shared
    shared = [tape.explain(target=t, mode=mode, share=True) for t in range(3)]
    key = "abs_total" if mode == "default" else "sides"  # contrastive: P and N per unit
    assert len(tape.shared) == 3 and all(key in d for d in tape.shared.values())
    for a, b in zip(plain, shared):
        assert torch.equal(a.inputs["input"], b.inputs["input"])
        if mode == "contrastive":
            assert torch.equal(a.positive["input"], b.positive["input"])
            assert torch.equal(a.negative["input"], b.negative["input"])
        assert a.absorbed == b.absorbed


def test_no_sharing_with_a_storage_policy():
    model = _mlp()
    with dlb.trace(model, storage="cpu") as tape:
        model(torch.randn(2, 6, dtype=torch.float64))
    tape.explain(share=True)
    assert not tape.shared


def test_generation_shares_and_matches():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).double().eval()
    ids = torch.randint(0, 37, (1, 6))
    a = dlb.explain_generation(model, ids, max_new_tokens=4, share=True)
    b = dlb.explain_generation(model, ids, max_new_tokens=4, share=False)
    assert torch.equal(a.generated, b.generated)
    assert torch.equal(a.matrix, b.matrix)
