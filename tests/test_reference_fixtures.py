"""Default mode equals the reference package dl-backtrace 0.1.24 on its fixtures."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import dlbhooks as dlb

FIXTURES = Path(__file__).parent / "fixtures"
CASES = sorted(p.stem for p in FIXTURES.glob("*.json"))


def build(arch):
    layers = []
    for kind, *args in arch:
        if kind == "linear":
            layers.append(nn.Linear(*args))
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "conv2d":
            cin, cout, k, stride, pad = args
            layers.append(nn.Conv2d(cin, cout, k, stride=stride, padding=pad))
        elif kind == "flatten":
            layers.append(nn.Flatten())
        else:
            raise ValueError(kind)
    return nn.Sequential(*layers)


@pytest.mark.parametrize("name", CASES)
def test_default_mode_matches_reference(name):
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    t = load_file(str(FIXTURES / f"{name}.safetensors"))
    model = build(meta["architecture"])
    model.load_state_dict({k[len("model."):]: v for k, v in t.items() if k.startswith("model.")})
    model.eval()
    assert torch.allclose(model(t["input"]), t["logits"], atol=1e-5)
    exp = dlb.explain(model, t["input"], target=meta["target"], multiplier=meta["multiplier"],
                      saturation=False)
    got = exp.inputs["input"]
    want = t["expected_input_relevance"].reshape(got.shape)
    rel = (got - want).abs().max() / want.abs().max()
    assert rel <= 1e-5, f"{name}: relative error {rel:.3e}"
    assert abs(float(got.sum()) - meta["input_relevance_sum"]) <= 1e-4 * meta["multiplier"]


def test_fixtures_present():
    assert len(CASES) >= 3
