"""Logits of some positions only (transformers' ``logits_to_keep``): ``dlb.explain`` asks a
causal LM for the last position's logits when that is all it explains, and a tape whose
forward kept some positions is explained at the right input position."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_conserved, tiny_llama
from torch import Tensor

import dlbhooks as dlb
from dlbhooks.api import last_logits_only
from dlbhooks.errors import TargetError

T = 9


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _ids(rows: int = 1, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 40, (rows, T), generator=torch.Generator().manual_seed(seed))


def _traced(model, inputs):
    with dlb.trace(model) as tape:
        out = model(**inputs)
    return tape, out


def _same(a: dlb.Explanation, b: dlb.Explanation) -> None:
    """Equal input relevance (to 1e-12 of its scale: the LM head's product over one row
    may sum in another order than over the picked row of all), target, positions, and
    the seed's total."""
    for name in b.inputs:
        scale = float(b.inputs[name].abs().max())
        torch.testing.assert_close(a.inputs[name], b.inputs[name], rtol=0,
                                   atol=1e-12 * scale)
    assert a.target == b.target
    assert a.info["position"] == b.info["position"]
    assert a.ledger[0].relevance_out == b.ledger[0].relevance_out


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_explain_records_the_last_logits_only_and_equals_the_full_forward(llama, mode):
    ids = _ids()
    seen = []
    handle = llama.lm_head.register_forward_hook(lambda m, a, o: seen.append(tuple(o.shape)))
    try:
        short = dlb.explain(llama, {"input_ids": ids}, target=5, mode=mode)
        full = dlb.explain(llama, {"input_ids": ids, "logits_to_keep": 0}, target=5, mode=mode)
    finally:
        handle.remove()
    assert seen == [(1, 1, 40), (1, T, 40)]  # the vocabulary projection of one position
    _same(short, full)
    assert short.info["position"] == [T - 1]
    assert_conserved(short)


def test_a_left_padded_batch_keeps_the_last_logits_and_explains_each_row(llama):
    ids = _ids(rows=2)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding: the last position is a real token in every row
    inputs = {"input_ids": ids, "attention_mask": mask}
    assert last_logits_only(llama, inputs, {}) == {"logits_to_keep": 1}
    short = dlb.explain(llama, inputs, target=[4, 7])
    full = dlb.explain(llama, {**inputs, "logits_to_keep": 0}, target=[4, 7])
    _same(short, full)
    assert short.info["position"] == [T - 1, T - 1]


def test_several_targets_at_the_last_position_use_the_last_logits(llama):
    ids = _ids()
    short = dlb.explain(llama, {"input_ids": ids}, targets=[3, 11])
    full = dlb.explain(llama, {"input_ids": ids, "logits_to_keep": 0}, targets=[3, 11])
    for a, b in zip(short, full):
        _same(a, b)


@pytest.mark.parametrize("options", [
    {"position": 3}, {"position": -2}, {"task": "binary"}, {"output": "past_key_values"},
    {"output": 0}, {"position": torch.tensor([T - 1, T - 1])}, {"position": [-1, -1]}])
def test_other_positions_tasks_and_outputs_keep_every_logit(llama, options):
    assert last_logits_only(llama, {"input_ids": _ids()}, options) == {}


def test_right_padding_inputs_that_set_it_labels_and_other_models_keep_every_logit(llama):
    ids = _ids(rows=2)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, -2:] = 0  # right padding: row 0's last real token is not the last position
    assert last_logits_only(llama, {"input_ids": ids, "attention_mask": mask}, {}) == {}
    assert last_logits_only(llama, {"input_ids": ids, "logits_to_keep": 3}, {}) == {}
    assert last_logits_only(llama, {"input_ids": ids, "labels": ids}, {}) == {}
    assert last_logits_only(llama, ids, {}) == {}  # not inputs by name
    assert last_logits_only(llama.model, {"input_ids": ids}, {}) == {}  # no such argument
    assert last_logits_only(torch.nn.Linear(3, 2), {"input": ids}, {}) == {}


def test_positions_as_a_tensor_or_a_list_explain_the_full_forward(llama):
    ids = _ids(rows=2)
    for position in (torch.tensor([T - 1, T - 2]), [-1, 3]):
        exp = dlb.explain(llama, {"input_ids": ids}, target=[1, 2], position=position)
        assert exp.info["position"] == [T - 1, T - 2 if isinstance(position, Tensor) else 3]


def test_right_padding_explains_each_rows_last_real_token(llama):
    ids = _ids(rows=2)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, -2:] = 0
    exp = dlb.explain(llama, {"input_ids": ids, "attention_mask": mask}, target=[2, 2])
    assert exp.info["position"] == [T - 3, T - 1]


@pytest.mark.parametrize("keep, position", [
    (1, None), (3, None), (3, T - 2), (3, -3), (torch.tensor([2, 5]), 5),
    (torch.tensor([2, 5]), 2)])
def test_a_traced_forward_that_kept_some_logits_explains_the_input_position(
        llama, keep, position):
    ids = _ids()
    tape, out = _traced(llama, {"input_ids": ids, "logits_to_keep": keep})
    n = keep if isinstance(keep, int) else keep.numel()
    assert out.logits.shape[1] == n
    full, _ = _traced(llama, {"input_ids": ids})
    a = tape.explain(7, position=position)
    b = full.explain(7, position=position)
    _same(a, b)
    expected = T - 1 if position is None else position % T
    assert a.info["position"] == [expected]


@pytest.mark.parametrize("keep, position", [(1, T - 2), (3, 2), (torch.tensor([2, 5]), 4)])
def test_a_position_without_logits_is_a_clear_error(llama, keep, position):
    tape, _ = _traced(llama, {"input_ids": _ids(), "logits_to_keep": keep})
    with pytest.raises(TargetError, match="have no logits.*logits_to_keep=0"):
        tape.explain(7, position=position)


@pytest.mark.parametrize("keep", [torch.tensor([[2, 5]]), torch.ones(1, T, dtype=torch.bool)])
def test_per_row_or_boolean_logits_to_keep_is_a_clear_error(llama, keep):
    tape, _ = _traced(llama, {"input_ids": _ids(), "logits_to_keep": keep})
    with pytest.raises(TargetError, match="logits_to_keep"):
        tape.explain(7)


def test_a_padded_row_whose_last_real_token_has_no_logits_is_an_error(llama):
    ids = _ids(rows=2)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[0, -2:] = 0
    tape, _ = _traced(llama, {"input_ids": ids, "attention_mask": mask, "logits_to_keep": 1})
    with pytest.raises(TargetError, match=rf"position\(s\) \[{T - 3}\] of rows \[0\]"):
        tape.explain(7)


#: the coverage probes that are causal LMs (tests/probe_models.py)
CAUSAL_PROBES = [
    "Llama", "Mistral", "Qwen2", "Qwen3", "Gemma2", "Gemma3 (text)", "Phi3", "GPT-2", "OLMo",
    "OLMo2", "Phi (Phi-2)", "GPT-NeoX", "Falcon", "StableLM", "StarCoder2", "OPT", "Bloom",
    "GPT-J", "Granite", "Cohere", "SmolLM3", "DeepSeek-V2", "DeepSeek-V3", "Llama 4 (text)",
    "Qwen3-MoE", "OLMoE", "Mixtral", "Qwen2-MoE", "GPT-OSS", "GraniteMoE", "JetMoE"]


@pytest.mark.parametrize("name", CAUSAL_PROBES)
def test_every_causal_lm_probe_explains_the_same_with_the_last_logits_only(name):
    """The coverage probes' causal LMs (GPT-2, Gemma 2's soft-capped logits, MoE, ...),
    on their unpadded row: dlb.explain with the last logits equals the full forward, or
    both refuse the model alike (DeepSeek's attention)."""
    from probe_models import PROBES

    p = PROBES[name]()
    inputs = {k: v[:1] for k, v in p.inputs.items()}
    assert last_logits_only(p.model, inputs, p.explain) == {"logits_to_keep": 1}
    try:
        full = dlb.explain(p.model, {**inputs, "logits_to_keep": 0}, **p.explain)
    except dlb.DLBError as err:  # refused (the coverage probe says so): refused alike
        with pytest.raises(type(err), match="no recorded module produced it"):
            dlb.explain(p.model, inputs, **p.explain)
        assert name.startswith("DeepSeek"), err
        return
    _same(dlb.explain(p.model, inputs, **p.explain), full)


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_generation_records_the_logits_of_the_generated_tokens_only(llama, mode, monkeypatch):
    """explain_generation's forward computes logits at the n positions that predict the
    n generated tokens only; its matrix equals the full forward's."""
    import dlbhooks.generation as generation

    prompt = _ids()
    seen = []
    handle = llama.lm_head.register_forward_hook(lambda m, a, o: seen.append(tuple(o.shape)))
    try:
        short = dlb.explain_generation(llama, prompt, max_new_tokens=4, mode=mode)
        traced = seen[-1]
        monkeypatch.setattr(generation, "takes_logits_to_keep", lambda model: False)
        full = dlb.explain_generation(llama, prompt, max_new_tokens=4, mode=mode)
    finally:
        handle.remove()
    assert traced == (1, 4, 40) and seen[-1] == (1, T + 3, 40)
    assert torch.equal(short.generated, full.generated)
    scale = float(full.matrix.abs().max())
    torch.testing.assert_close(short.matrix, full.matrix, rtol=0, atol=1e-12 * scale)
    assert short.conservation_error() < 1e-12


@pytest.mark.parametrize("positions, target, shape", [
    ([-1], None, 1), ([T - 3, -2, -1], None, 3), ([2, 5], None, 2), ([2, 4, T - 3], "next", 3)])
def test_corpus_batches_record_the_logits_of_the_explained_positions_only(
        llama, positions, target, shape, monkeypatch):
    """dlbhooks.corpus.explain_batch (expert statistics over a corpus) computes logits at
    the explained positions only (the last n as an int, others by index), with each
    position's explanation equal to the full forward's."""
    import dlbhooks.corpus as corpus

    ids = _ids(rows=2, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding (no explained position on it)
    batch = {"input_ids": ids, "attention_mask": mask}
    seen = []
    handle = llama.lm_head.register_forward_hook(lambda m, a, o: seen.append(tuple(o.shape)))
    try:
        short, _ = corpus.explain_batch(llama, batch, positions=positions, target=target)
        monkeypatch.setattr(corpus, "takes_logits_to_keep", lambda model: False)
        full, _ = corpus.explain_batch(llama, batch, positions=positions, target=target)
    finally:
        handle.remove()
    length = T - (target == "next")
    assert seen == [(2, shape, 40), (2, length, 40)]
    for a, b in zip(short, full):
        _same(a, b)
