"""Session set-up: two threads, a fixed Hypothesis profile under CI, and no silent skips."""

from __future__ import annotations

import os
import re
import sys
from datetime import timedelta

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

# CI (CI=true): the same examples on every run, so that a failure reproduces and a green run
# does not depend on luck; no example database (nothing to replay from)
settings.register_profile("ci", derandomize=True, database=None,
                          deadline=timedelta(seconds=5), print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

#: The only acceptable skips: a regular expression searched in the skip reason -> why it is
#: acceptable. Any other skip (or xfail) fails the session: a dependency the tests need is
#: missing, and a test that does not run cannot fail.
ALLOWED_SKIPS: dict[str, str] = {
    r"needs Linux /proc": "test_offload_memory measures resident pages through "
                          "/proc/self/clear_refs, which only Linux has",
    r"needs headless Chromium": "test_report_chromium renders reports in Debian's chromium "
                                "package, which .ci/run installs; other machines may lack it",
}

_unexpected: list[str] = []


def _reason(report) -> str:
    if hasattr(report, "wasxfail"):
        return f"xfail: {report.wasxfail}"
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _note_skip(report) -> None:
    if report.skipped:
        reason = _reason(report)
        if hasattr(report, "wasxfail") or not any(re.search(p, reason) for p in ALLOWED_SKIPS):
            _unexpected.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report) -> None:
    _note_skip(report)


def pytest_collectreport(report) -> None:
    _note_skip(report)  # (a module-level skip, e.g. pytest.importorskip)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _unexpected and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if _unexpected:
        terminalreporter.section("skips not in tests/conftest.py ALLOWED_SKIPS", red=True)
        for line in _unexpected:
            terminalreporter.line(line, red=True)
