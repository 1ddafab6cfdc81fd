"""Save / load of every result type keeps every field, in both modes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

import dlbhooks as dlb


def _equal(a, b, where: str) -> None:
    """Deep equality: tensors equal in dtype, shape and every value; containers by item."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype} {b.dtype}"
        assert torch.equal(a.cpu(), b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} {list(b)}"
        for k in a:
            _equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{i}]")
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            _equal(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def moe():
    """A tiny Qwen2-MoE: heads, blocks, routed and shared experts, routing."""
    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=48, hidden_size=16, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=24,
                         moe_intermediate_size=8, shared_expert_intermediate_size=12,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    model = AutoModelForCausalLM.from_config(cfg).double().eval()
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    return model


IDS = torch.randint(1, 48, (2, 5), generator=torch.Generator().manual_seed(1))
MASK = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_explanation_round_trip_keeps_every_field(moe, mode, tmp_path):
    exp = dlb.explain(moe, {"input_ids": IDS, "attention_mask": MASK}, mode=mode, scaler=1.0)
    assert exp.heads and exp.blocks and exp.experts and exp.routing and exp.tensors
    assert (exp.positive is not None) == (mode == "contrastive")
    exp.save(tmp_path / "e.safetensors")
    back = dlb.Explanation.load(tmp_path / "e.safetensors")
    _equal(exp, back, "exp")  # every dataclass field, tensors bit for bit
    assert back.conservation_error() == exp.conservation_error() <= 1e-12
    _equal(exp.at("model.layers.1"), back.at("model.layers.1"), "at")
    assert back.expert_columns("model.layers.0.mlp") == ["0", "1", "2", "3", "shared"]


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_generation_round_trip_keeps_every_field(moe, mode, tmp_path):
    gen = dlb.explain_generation(moe, IDS[:1], max_new_tokens=3, mode=mode)
    assert gen.conservation_error() <= 1e-12
    if mode == "contrastive":  # the per-stream totals are what the identity needs
        assert gen.absorbed_positive is not None and gen.absorbed_negative is not None
        torch.testing.assert_close(gen.absorbed, gen.absorbed_positive - gen.absorbed_negative,
                                   rtol=0, atol=1e-12)
    gen.save(tmp_path / "g.safetensors")
    back = dlb.GenerationExplanation.load(tmp_path / "g.safetensors")
    _equal(gen, back, "gen")
    assert back.conservation_error() == gen.conservation_error()


def test_generation_conservation_error_sees_a_leak(moe):
    gen = dlb.explain_generation(moe, IDS[:1], max_new_tokens=2)
    gen.absorbed[1] += 0.25  # a quarter of a unit unaccounted for, on a seed of 100
    assert gen.conservation_error() == pytest.approx(0.0025, rel=1e-9)


def test_expert_stats_round_trip_keeps_every_field(moe, tmp_path):
    stats = dlb.ExpertStats()
    for mode in ("default", "contrastive"):
        stats.add(dlb.explain(moe, {"input_ids": IDS, "attention_mask": MASK}, mode=mode),
                  mask=MASK)
    assert stats.layers["model.layers.0.mlp"].shared  # the shared expert is kept apart
    stats.save(tmp_path / "s.safetensors")
    back = dlb.ExpertStats.load(tmp_path / "s.safetensors")
    _equal(stats, back, "stats")
