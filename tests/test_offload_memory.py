"""A fully disk-offloaded model is explained without holding its weights in memory.

Runs ``scripts/offload_memory.py`` in a subprocess (a clean process, so the peak resident
memory is ours alone): a random Llama of about 400 MB fp32, every module offloaded to
disk. Bound: trace + explain raise the peak resident memory by less than 0.3× the model's
size (measured 0.19× for 388 MiB at 16 tokens: the largest weight is 16 MiB, the
records 11 MiB; about 70 MiB of the rise does not grow with the model, so the ratio falls
for larger models).

About one run in ten on the 2-vCPU CI machine peaks near 0.5× for reasons outside the
process (not reproducible with the garbage collector off, under CPU load, or with one malloc
arena); a run above the bound is repeated, up to three runs, and the smallest peak counts.
A real regression (weights held) puts every run at ≥ 1×.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "offload_memory.py"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_of_a_fully_offloaded_model_stays_far_below_its_size():
    pytest.importorskip("accelerate")
    runs = []
    for _ in range(3):
        done = subprocess.run([sys.executable, str(SCRIPT), "--size-mb", "400", "--json"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
        assert out["params_on_meta"] == out["params"]  # every weight was on disk
        assert out["finite"]
        assert out["model_bytes"] > 350 * 2**20
        runs.append(out)
        if out["peak_increase"] < 0.3 * out["model_bytes"]:
            break
    assert min(r["peak_increase"] for r in runs) < 0.3 * out["model_bytes"], runs
