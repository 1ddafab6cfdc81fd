"""Write the HTML report of one explanation of the shipped tiny MoE and, when headless
Chromium is installed (Debian's ``chromium``), a screenshot of it: what a user sees.

    python scripts/render_report.py [--out report.html] [--png report.png]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import torch

import dlbhooks as dlb
from dlbhooks.tiny_moe import decode, encode, load_tiny_moe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="report.html")
    ap.add_argument("--png", default="report.png")
    ap.add_argument("--mode", default="default", choices=["default", "contrastive"])
    args = ap.parse_args()
    model = load_tiny_moe(dtype=torch.float64)[0]
    ids = encode("def add(a, b):\n    return a + b")[None]
    with dlb.trace(model) as tape:
        model(input_ids=ids)
    exp = tape.explain(mode=args.mode)
    tokens = [decode([int(i)]) for i in ids[0]]
    Path(args.out).write_text(exp.to_html(tokens, title="tiny MoE: the next token after code"),
                              encoding="utf-8")
    print(f"wrote {args.out} ({Path(args.out).stat().st_size:,} bytes)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("no chromium on PATH: no screenshot")
        return
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={args.png}", "--window-size=1200,1400",
                    Path(args.out).resolve().as_uri()], check=True, capture_output=True,
                   timeout=120)
    size = Path(args.png).stat().st_size
    if size < 10_000:
        raise SystemExit(f"{args.png} is {size} bytes: the page did not render")
    print(f"wrote {args.png} ({size:,} bytes)")


if __name__ == "__main__":
    main()
