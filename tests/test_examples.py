"""The examples run offline and say what they claim."""

from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tabular_breast_cancer(capsys):
    out = load("tabular_breast_cancer").main(["--seed", "0"])
    assert out["accuracy"] > 0.9
    R = out["relevance"]
    assert R.shape[1] == 30 and (R >= 0).all()  # default mode: |w·a| shares of a positive seed
    # a float32 model: measured 2.4e-8 of the seed overall, 1.7e-7 for the worst call
    assert abs(out["seed_total"] - out["input_total"] - out["absorbed"]) < 1e-7 * out["seed_total"]
    assert out["worst_residual"] < 6e-7
    text = capsys.readouterr().out
    assert "held-out accuracy" in text and "R+" in text and "conservation" in text


def test_lstm_planted_signal(capsys):
    out = load("lstm_planted_signal").main(["--seed", "0"])
    assert out["accuracy"] > 0.9 and out["detected"] > 50
    # relevance concentrates on the planted bump: well above an even spread (3/40)
    assert out["share"] > 2 * 3 / 40
    assert out["conservation_error"] < 3e-7  # float32: measured 5.7e-8
    assert "bump marked" in capsys.readouterr().out
