"""What a new user meets first: inputs as a tokenizer returns them, a helpful KeyError, a
short printout."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_llama
from torch import nn
from transformers import BatchEncoding

import dlbhooks as dlb


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def test_a_batch_encoding_is_keyword_inputs(llama):
    ids = torch.randint(1, 40, (1, 12))
    enc = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    exp = dlb.explain(llama, enc)  # a Mapping, not a dict: it used to reach the model whole
    ref = dlb.explain(llama, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert torch.equal(exp.inputs["input_ids"], ref.inputs["input_ids"])


def test_an_unknown_input_name_lists_the_known_ones():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    exp = dlb.explain(model, torch.randn(2, 3, dtype=torch.float64), mode="contrastive")
    for d in (exp.inputs, exp.positive, exp.negative):
        with pytest.raises(KeyError, match=r"'x' is not an explained input; the inputs are "
                                           r"\['input'\]"):
            d["x"]


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_printing_an_explanation_is_a_short_summary(llama, mode, tmp_path):
    ids = torch.randint(1, 40, (1, 12))
    exp = dlb.explain(llama, {"input_ids": ids}, mode=mode)
    text = str(exp)
    assert len(text) < 1000, text  # was ~578,000 characters of tensors
    assert f"mode={mode!r}" in text and f"target={exp.target!r}" in text
    assert "input 'input_ids' [1, 12]" in text and "conservation error" in text
    assert ("+ stream" in text) == (mode == "contrastive")
    exp.save(tmp_path / "e.safetensors")
    assert str(dlb.Explanation.load(tmp_path / "e.safetensors")) == text


def test_negative_class_indices_count_from_the_end_and_text_is_a_target_error():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4)).double()
    x = torch.randn(2, 5, dtype=torch.float64)
    for neg, pos in ((-1, 3), ([-1, -4], [3, 0])):
        a, b = dlb.explain(model, x, target=neg), dlb.explain(model, x, target=pos)
        assert torch.equal(a.inputs["input"], b.inputs["input"]) and a.target == b.target == pos
    with pytest.raises(dlb.TargetError, match="out of range"):
        dlb.explain(model, x, target=-5)
    with pytest.raises(dlb.TargetError, match="is text"):
        dlb.explain(model, x, target="cat")


def test_weights_changed_after_the_forward_are_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with dlb.trace(model) as tape:
        model(x)
    tape.explain()  # unchanged: fine
    with torch.no_grad():
        model[2].weight.mul_(2)  # an optimizer step, in place
    with pytest.raises(dlb.RecordModifiedError, match=r"1 weight\(s\).*2\.weight"):
        tape.explain()


def test_two_forwards_in_one_block_and_training_mode_warn():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="training mode with 1 active dropout"):
        with dlb.trace(model) as tape:
            model(x)
    model.eval()
    with dlb.trace(model) as tape:
        model(x)
        model(2 * x)
    with pytest.warns(UserWarning, match="holds 2 calls of the model; explaining the last"):
        exp = tape.explain()
    assert torch.equal(exp.inputs["input"], dlb.explain(model, 2 * x).inputs["input"])


def test_segmentation_threshold_error_says_which_threshold_selects_pixels():
    from dlbhooks.seeds import make_seed

    out = torch.zeros(2, 3, 4, 4, dtype=torch.float64)  # unsure everywhere: p = 1/3
    with pytest.raises(dlb.TargetError, match=r"rows \[0, 1\].*highest probability of the "
                                              r"explained class is 0\.333.*thresholding=0\.3"):
        make_seed(out, task="segmentation")
    seed = make_seed(out, task="segmentation", thresholding=0.3)  # the suggestion works
    assert float(seed.sum()) == pytest.approx(200.0, rel=1e-12)
