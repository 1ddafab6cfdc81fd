"""``scripts/benchmark_faithfulness.py --quick``: every number finite, and on the
ground-truth tasks dlbhooks (default mode) ranks the truly relevant inputs first more often
than a random ranking does."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_faithfulness.py"


def _script():
    spec = importlib.util.spec_from_file_location("benchmark_faithfulness", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark(tmp_path):
    assert _script().main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "faithfulness.json").read_text())
    text = (tmp_path / "faithfulness.md").read_text()
    assert "## Where dlbhooks wins, ties and loses" in text
    assert list((tmp_path / "img").glob("faithfulness_*.png"))
    truth = [d for d in results if d.startswith("ground truth")]
    assert len(truth) == 4 and len(results) >= 9
    for dataset, values in results.items():
        for key, v in values.items():
            if "complexity" in key or "sparseness" in key:
                continue  # undefined (NaN) for an all-zero map, which a method may give
            assert v and all(math.isfinite(x) for x in v), (dataset, key)
    for dataset in truth:
        ours = results[dataset]["dlbhooks default | top-k hit"]
        rnd = results[dataset]["random | top-k hit"]
        assert sum(ours) / len(ours) > sum(rnd) / len(rnd), dataset
