"""The verdict lines of scripts/prune_experts.py name each baseline with the comparison it
earns (once one line said "does not beat frequency (+1.2230)" for relevance +1.1244)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "prune_experts.py"
    spec = importlib.util.spec_from_file_location("prune_experts", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_baseline_gets_its_own_comparison():
    line = _script().verdict("code", 0.5, rel=2.5584, base=1.4340,
                             others={"frequency": 2.6570, "random (mean of 3)": 2.5209})
    assert line == ("- code, 50%: relevance-based pruning (+1.1244) **beats** frequency "
                    "(+1.2230); does **not** beat random (mean of 3) (+1.0869), on the code "
                    "held-out loss.")
