"""Write docs/coverage.md: which architectures dlbhooks explains today.

Runs the probes of ``tests/probe_models.py`` (the same ones ``tests/test_coverage_probe.py``
checks): each tiny model, built from a config with random weights in float64, is run
untraced and traced, explained in default and contrastive mode, and reported as working
(unchanged output, conservation to 1e-12, padding exactly 0) or with the dlbhooks error it
raised and the operation or module that error names.

    python scripts/coverage_table.py                      # writes docs/coverage.md
    python scripts/coverage_table.py --out /tmp/c.md      # elsewhere
    python scripts/coverage_table.py --only Llama T5      # a few probes (printed, not written)
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
torch.set_num_threads(min(2, torch.get_num_threads()))  # as tests/conftest.py

import probe_models as pm  # noqa: E402


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ").replace("`", "'")


def table(results: list[pm.Result]) -> list[str]:
    lines = ["| # | Architecture | Source | Default | Contrastive | Conservation error | "
             "dlbhooks error | Operation / module named | Message (first line) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        err = pm.conservation(r)
        cls, named, line = pm.describe_failure(r)
        lines.append("| " + " | ".join([
            str(i), cell(r.name), r.source, *(cell(pm.mode_status(r, m)) for m in pm.MODES),
            "" if err is None else f"{err:.1e}", cell(cls),
            f"`{cell(named)}`" if named else "", cell(line)]) + " |")
    return lines


def categories(results: list[pm.Result]) -> list[str]:
    groups: dict[str, list[str]] = defaultdict(list)
    for r in results:
        if not r.working:
            groups[pm.failure_category(r)].append(r.name)
    lines = ["| Failure (error class: operation or module type) | Count | Architectures |",
             "|---|---|---|"]
    for cat, names in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        lines.append(f"| {cell(cat)} | {len(names)} | {cell(', '.join(names))} |")
    return lines


def notes(results: list[pm.Result]) -> list[str]:
    return [f"- **{r.name}**: {r.note}" for r in results if r.note]


def report(results: list[pm.Result], seconds: float) -> str:
    v = pm.versions()
    working = sum(r.working for r in results)
    n = len(results)
    by_source = defaultdict(lambda: [0, 0])
    for r in results:
        by_source[r.source][0] += r.working
        by_source[r.source][1] += 1
    intro = [
        "# Architecture coverage",
        "",
        f"Written by `python scripts/coverage_table.py` on {datetime.date.today()} "
        f"({seconds:.0f} s on {torch.get_num_threads()} threads); the same probes are checked "
        "by `tests/test_coverage_probe.py`. Environment: Python "
        f"{v['python']}, torch {v['torch']}, transformers {v['transformers']}, torchvision "
        f"{v['torchvision']}.",
        "",
        f"Each of the {n} architectures is built once, without network, from a tiny config "
        "with random weights (transformers: `from_config`-style construction, hidden size "
        "16–32, 2 layers, 2–4 heads, vocabulary 64; torchvision: the real constructors with "
        "`weights=None`; a few hand-written nets), seeded, in **float64** and eval mode, "
        "with eager attention. Text models get a batch of 2 × 7 tokens whose second row is "
        "padded (right-padded, except XLNet: left) through `attention_mask`; images are "
        "32 × 32 (Inception v3: 75 × 75, its minimum). For each model:",
        "",
        "1. the untraced forward and the forward inside `dlb.trace` must give the same main "
        "output (`torch.equal`);",
        "2. `tape.explain` runs in `default` and `contrastive` mode (masked or decoder "
        "outputs at the last position, segmentation outputs with `task=\"segmentation\"`, "
        "a named output with `output=`);",
        "3. **working** means both modes ran, `exp.conservation_error()` ≤ 1e-12 (relative) "
        "and padded tokens got exactly 0 relevance in every stream. Otherwise the table "
        "gives the `dlb.DLBError` subclass raised (a *crash* is any other exception) and "
        "the operation or module its message names — the first place, walking back from "
        "the output, that dlbhooks cannot handle (later gaps are hidden behind it).",
        "",
    ]
    counts = [f"- {src}: {w} of {t}" for src, (w, t) in by_source.items()]
    return "\n".join(intro + table(results) + [
        "", "## Failures by category", ""] + categories(results) + [
        "", "## Probe notes", ""] + notes(results) + [
        "", "## Counts", ""] + counts + [
        "", f"**{working} working of {n}** ({working / n:.0%}).", ""])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "coverage.md")
    ap.add_argument("--only", nargs="+", help="probe names (prints instead of writing)")
    args = ap.parse_args(argv)
    names = args.only or list(pm.PROBES)
    t0 = time.perf_counter()
    results = []
    for name in names:
        r = pm.run_probe(name)
        results.append(r)
        print(f"{r.seconds:6.1f} s  {name:38} {pm.mode_status(r, 'default')} / "
              f"{pm.mode_status(r, 'contrastive')}", file=sys.stderr, flush=True)
    text = report(results, time.perf_counter() - t0)
    if args.only:
        print(text)
        return
    args.out.write_text(text)
    working = sum(r.working for r in results)
    print(f"wrote {args.out}: {working} working of {len(results)}", file=sys.stderr)


if __name__ == "__main__":
    main()
