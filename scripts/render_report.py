"""Write HTML reports of the shipped models' explanations and, when headless Chromium is
installed (Debian's ``chromium``), screenshots of them: what a user sees.

* ``moe``: the tiny MoE language model, the next token after a line of code (tokens,
  heads, experts and routing);
* ``image``: the digits CNN on a held-out digit (pixel heatmap);
* ``tabular``: a small MLP on the breast-cancer features of scikit-learn (feature bars).

    python scripts/render_report.py [--kind all] [--dir .]   (docs/img holds the README's)
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import torch

import dlbhooks as dlb


def moe_report() -> str:
    from dlbhooks.tiny_moe import decode, encode, load_tiny_moe

    model = load_tiny_moe(dtype=torch.float64)[0]
    ids = encode("def add(a, b):\n    return a + b")[None]
    with dlb.trace(model) as tape:
        model(input_ids=ids)
    tokens = [decode([int(i)]) for i in ids[0]]
    return tape.explain().to_html(tokens, title="tiny MoE: the next token after code")


def image_report() -> str:
    from dlbhooks.demo import load_digits_model

    model, images, labels = load_digits_model()[:3]
    exp = dlb.explain(model.double(), images[:1].double(), mode="contrastive")
    return exp.to_html(title=f"digits CNN: a held-out {int(labels[0])}, contrastive")


def tabular_report() -> str:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 2)).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    y = torch.tensor(data.target)
    for _ in range(200):  # a few seconds: good enough to have something to explain
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    exp = dlb.explain(model, x[:1])
    return exp.to_html(title="breast-cancer MLP: one patient (features by relevance)")


KINDS = {"moe": moe_report, "image": image_report, "tabular": tabular_report}


def screenshot(page: Path, png: Path) -> int:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return 0
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={png}", "--window-size=1100,900", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    size = png.stat().st_size
    if size < 10_000:
        raise SystemExit(f"{png} is {size} bytes: the page did not render")
    return size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", choices=[*KINDS, "all"], default="all")
    ap.add_argument("--dir", default=".", help="where report_<kind>.html/.png go")
    args = ap.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    for kind in KINDS if args.kind == "all" else [args.kind]:
        page = out / f"report_{kind}.html"
        page.write_text(KINDS[kind](), encoding="utf-8")
        size = screenshot(page, out / f"report_{kind}.png")
        shot = f", screenshot {size:,} bytes" if size else " (no chromium: no screenshot)"
        print(f"{kind}: {page} ({page.stat().st_size:,} bytes){shot}")


if __name__ == "__main__":
    main()
