"""Default mode equals the reference package dl-backtrace 0.1.24 on its fixtures.

The fixtures (tests/fixtures) hold a small model, an input and the input relevance that the
reference computed. ``python tests/test_reference_fixtures.py`` prints the largest relative
error per fixture (the number the README states); the test prints it too (``pytest -s``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import dlbhooks as dlb

FIXTURES = Path(__file__).parent / "fixtures"
CASES = sorted(p.stem for p in FIXTURES.glob("*.json"))
# float32 rounding: measured 1.2e-7 to 1.6e-7 (a few roundings of the largest entry)
REL_TOL = 1e-6


def build(arch: list) -> nn.Sequential:
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


def compare(name: str) -> dict:
    """Our input relevance against the reference's on fixture ``name``."""
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    t = load_file(str(FIXTURES / f"{name}.safetensors"))
    model = build(meta["architecture"])
    model.load_state_dict({k[len("model."):]: v for k, v in t.items() if k.startswith("model.")})
    model.eval()
    exp = dlb.explain(model, t["input"], target=meta["target"], multiplier=meta["multiplier"],
                      saturation=False)
    got = exp.inputs["input"]
    want = t["expected_input_relevance"].reshape(got.shape)
    with torch.no_grad():
        logits_error = float((model(t["input"]) - t["logits"]).abs().max())
    return {"logits_error": logits_error,
            "rel_error": float((got - want).abs().max() / want.abs().max()),
            "sum": float(got.sum()), "ref_sum": meta["input_relevance_sum"],
            "multiplier": meta["multiplier"], "mode": meta["mode"]}


@pytest.mark.parametrize("name", CASES)
def test_default_mode_matches_reference(name: str) -> None:
    r = compare(name)
    print(f"\n{name}: largest relative error {r['rel_error']:.2e} against dl-backtrace 0.1.24")
    assert r["mode"] == "default"
    assert r["logits_error"] <= 1e-5  # the fixture's weights load into the same model
    assert r["rel_error"] <= REL_TOL, f"{name}: relative error {r['rel_error']:.3e}"
    # the input total (what the biases leave) agrees to float32 rounding of a sum
    assert abs(r["sum"] - r["ref_sum"]) <= 1e-5 * r["multiplier"], r


def test_fixtures_present() -> None:
    assert CASES == ["cnn_small", "mlp_deep", "mlp_relu"]


if __name__ == "__main__":
    torch.set_num_threads(min(2, torch.get_num_threads()))
    for case in CASES:
        res = compare(case)
        print(f"{case:<10} largest relative error {res['rel_error']:.2e}, input total "
              f"{res['sum']:.5f} (reference {res['ref_sum']:.5f})")
