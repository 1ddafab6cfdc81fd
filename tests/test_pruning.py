"""Expert pruning: the smaller checkpoint (experts physically removed) computes what the
masked-routing model computes, with the right number of parameters fewer."""

import json

import pytest
import torch
import transformers
from test_moe import IDS, build

from dlbhooks.analysis.pruning import drop_experts, pruned, write_pruned_checkpoint


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def per_expert(model) -> int:
    """Parameters one expert of one block holds (its weights, its router row), from the
    config (independently of the pruning code)."""
    c = model.config
    Hd = c.hidden_size
    if c.model_type == "gpt_oss":
        I = c.intermediate_size
        return Hd * 2 * I + 2 * I + I * Hd + Hd + Hd + 1  # weights, biases, router row + bias
    I = c.moe_intermediate_size if c.model_type in ("qwen3_moe", "qwen2_moe") else \
        c.intermediate_size
    return 2 * I * Hd + Hd * I + Hd


def reload(path, dtype=torch.float64):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, experts_implementation="eager").eval()


@pytest.mark.parametrize("name", ["qwen3_moe", "olmoe", "mixtral", "gpt_oss", "qwen2_moe"])
def test_checkpoint_equals_masked_routing(name, tmp_path):
    model = build(name)
    plan = {"model.layers.0.mlp": [1], "model.layers.1.mlp": [3]}
    with torch.no_grad():
        full = model(input_ids=IDS, use_cache=False).logits
        with pruned(model, plan):
            want = model(input_ids=IDS, use_cache=False).logits
    before = n_params(model)
    write_pruned_checkpoint(model, plan, tmp_path)
    assert n_params(model) == before  # the original is untouched
    assert torch.equal(model(input_ids=IDS, use_cache=False).logits, full)
    small = reload(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    with torch.no_grad():
        got = small(input_ids=IDS, use_cache=False).logits
    assert not torch.allclose(want, full)  # the pruning changed something ...
    assert torch.allclose(got, want, rtol=0, atol=1e-12)  # ... and the checkpoint agrees
    assert before - n_params(small) == 2 * per_expert(model)
    assert small.config.num_experts == 3 and small.model.layers[1].mlp.experts.num_experts == 3
    kept = json.loads((tmp_path / "pruned_experts.json").read_text())["kept"]
    assert kept == {"model.layers.0.mlp": [0, 2, 3], "model.layers.1.mlp": [0, 1, 2]}


def test_shipped_tiny_moe_checkpoint(tmp_path):
    from dlbhooks.tiny_moe import encode, load_tiny_moe

    model, _ = load_tiny_moe(dtype=torch.float64)
    E, L = model.config.num_experts, model.config.num_hidden_layers
    plan = {f"model.layers.{i}.mlp": [i, (i + 3) % E] for i in range(L)}
    ids = encode("def f(x):\n    return x + 1\n", bos=True)[None]
    with torch.no_grad(), pruned(model, plan):
        want = model(input_ids=ids, use_cache=False).logits
    small = write_pruned_checkpoint(model, plan, tmp_path)
    back = reload(tmp_path)
    with torch.no_grad():
        got = back(input_ids=ids, use_cache=False).logits
        direct = small(input_ids=ids, use_cache=False).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    assert torch.equal(got, direct)
    assert n_params(model) - n_params(back) == L * 2 * per_expert(model)
    assert back.config.num_experts == E - 2


def test_unequal_counts_and_bad_plans_raise():
    model = build("qwen3_moe")
    with pytest.raises(ValueError, match="same number of experts"):
        drop_experts(model, {"model.layers.0.mlp": [1]})
    with pytest.raises(ValueError, match="not MoE blocks"):
        drop_experts(model, {"model.layers.0.self_attn": [1]})
    with pytest.raises(ValueError, match="top_k"):
        drop_experts(model, {f"model.layers.{i}.mlp": [0, 1, 2] for i in range(2)})
    with pytest.raises(ValueError, match="out of range"):
        drop_experts(model, {f"model.layers.{i}.mlp": [4] for i in range(2)})
    with pytest.raises(ValueError, match="out of range"):  # e.g. a shared expert's column
        with pruned(model, {"model.layers.0.mlp": [4]}):
            pass
    plan = {f"model.layers.{i}.mlp": [0] for i in range(2)}
    with pruned(model, plan), pytest.raises(ValueError, match="masked by pruned"):
        drop_experts(model, plan)
    assert model.config.num_experts == 4 and model.model.layers[0].mlp.gate.weight.shape[0] == 4
    kept = drop_experts(model, plan)  # in place
    assert kept == {f"model.layers.{i}.mlp": [1, 2, 3] for i in range(2)}
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 3
