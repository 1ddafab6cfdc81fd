"""Coverage probe: every architecture of tests/probe_models.py, explained in float64 in both
modes. A probe passes when it works (the traced forward gives the untraced output bit for
bit, relevance conserves to 1e-12 relative, padded tokens get exactly 0) or when dlbhooks
refuses it cleanly (a ``dlb.DLBError`` whose message names a module path or an operation).
It fails on a crash (any other exception), on lost relevance and on a changed output.

The summary test prints the status table and holds the number of working architectures to
a floor. ``python scripts/coverage_table.py`` writes the same table to docs/coverage.md.
"""

from __future__ import annotations

import re

import pytest
from probe_models import (
    CONSERVATION_TOL,
    MODES,
    PROBES,
    Outcome,
    Result,
    conservation,
    describe_failure,
    mode_status,
    run_probe,
    versions,
)

#: Architectures that must keep working (measured when the probe was written: raise it as
#: families are added). The goal is 80 % of the probes.
MIN_WORKING = 67
GOAL = 0.8


def _clean_refusal(o: Outcome, step: str) -> None:
    assert o.dlb_error, (
        f"{step}: crashed with {o.error} (not a dlb.DLBError): {o.first_line}\n"
        f"record being processed: {o.record or '?'}\n{o.trace}")
    assert o.located, f"{step}: {o.error} names no module path or operation: {o.message}"


def _slug(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_")


@pytest.mark.parametrize("name", list(PROBES), ids=[_slug(n) for n in PROBES])
def test_probe(name: str) -> None:
    r = run_probe(name)
    assert not r.build_crash, f"the probe's builder failed (fix the probe):\n{r.build_crash}"
    assert not r.untraced_crash, f"the untraced forward failed (fix the probe):\n" \
                                 f"{r.untraced_crash}"
    if r.not_buildable:
        return  # counted as not working; the reason is in the table
    assert r.forward is not None
    if r.forward.status != "ok":
        _clean_refusal(r.forward, "traced forward")
        return
    assert r.traced_equal, f"tracing changed the output (max |difference| {r.traced_diff:.3e})"
    assert set(r.modes) == set(MODES)
    for mode, o in r.modes.items():
        if o.status != "ok":
            _clean_refusal(o, f"explain(mode={mode!r})")
            continue
        assert o.conservation is not None and o.conservation <= CONSERVATION_TOL, (
            f"{mode}: relative conservation error {o.conservation:.3e} > "
            f"{CONSERVATION_TOL:g}: {o.record}")
        assert o.pad_zero is not False, (
            f"{mode}: padded positions got relevance (max |R| {o.pad_max:.3e})")


def _line(r: Result) -> str:
    d, c = (mode_status(r, m) for m in MODES)
    err = conservation(r)
    cls, named, line = describe_failure(r, 80)
    detail = " | ".join(x for x in (cls, named, line) if x)
    return (f"{r.name[:34]:34} {r.source[:12]:12} {d[:24]:24} {c[:24]:24} "
            f"{'' if err is None else f'{err:.1e}':8} {detail}")


def test_summary(capsys: pytest.CaptureFixture[str]) -> None:
    results = [run_probe(n) for n in PROBES]  # cached: each model was built once
    working = sum(r.working for r in results)
    v = versions()
    lines = [f"coverage probe (torch {v['torch']}, transformers {v['transformers']}, "
             f"torchvision {v['torchvision']}; float64, tiny random configs)",
             f"{'architecture':34} {'source':12} {'default':24} {'contrastive':24} "
             f"{'cons.':8} failure",
             *map(_line, results),
             f"{working} working of {len(results)} ({working / len(results):.0%}; "
             f"floor {MIN_WORKING}, goal {GOAL:.0%})"]
    with capsys.disabled():  # shown in -q runs too
        print("\n" + "\n".join(lines))
    assert working >= MIN_WORKING, f"{working} architectures work, fewer than {MIN_WORKING}"
