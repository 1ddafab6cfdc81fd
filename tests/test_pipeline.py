"""``dlb.run_task`` picks the task from the model and the inputs (the reference project's
one-call interface) and gives what the direct calls give."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama

import dlbhooks as dlb

D = torch.float64


def test_tabular_and_image_inputs():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(),
                              torch.nn.Linear(4, 2)).double()
    x = torch.randn(3, 5, dtype=D)
    got = dlb.run_task(mlp, x, mode="contrastive")
    assert got.info["pipeline"] == "tabular"
    assert torch.equal(got.inputs["input"], dlb.explain(mlp, x, mode="contrastive").inputs["input"])
    from dlbhooks.demo import load_digits_model

    cnn, images = load_digits_model()[:2]
    assert dlb.run_task(cnn, images[:2]).info["pipeline"] == "image"


def test_text_inputs_by_head_and_generation():
    import transformers

    llama = tiny_llama()
    ids = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(0))
    lm = dlb.run_task(llama, {"input_ids": ids})
    assert lm.info["pipeline"] == "causal-lm"
    assert torch.equal(lm.inputs["input_ids"], dlb.explain(llama, {"input_ids": ids}).inputs[
        "input_ids"])
    gen = dlb.run_task(llama, ids, max_new_tokens=2)
    assert isinstance(gen, dlb.GenerationExplanation) and gen.info["pipeline"] == "generation"
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, num_labels=3)
    bert = transformers.BertForSequenceClassification(cfg).double().eval()
    cls = dlb.run_task(bert, torch.tensor([[2, 5, 7, 3]]), target=1)
    assert cls.info["pipeline"] == "text-classification" and cls.target == 1


def test_unclear_inputs_ask_for_the_task():
    mlp = torch.nn.Linear(3, 2)
    with pytest.raises(dlb.TargetError, match="give task="):
        dlb.run_task(mlp, torch.randn(2, 3, 4))
    with pytest.raises(dlb.TargetError, match="unknown task"):
        dlb.run_task(mlp, torch.randn(2, 3), task="audio")
    with pytest.raises(dlb.TargetError, match="tokenizer="):
        dlb.run_task(tiny_llama(), "a prompt")
