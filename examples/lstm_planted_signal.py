"""Which time steps made an LSTM fire? A planted signal shows whether the answer is right.

    python examples/lstm_planted_signal.py [--seed 0]

Synthetic series (offline; about 15 s on two CPU cores): 40 steps of noise; in class 1 a bump (three
steps of +1.5) sits at a random position. An LSTM (1 → 16 units) with a linear head learns
to detect it. For every detected series the explanation should put its relevance on the
bump, which the model never saw marked: the script prints the share of relevance that
lands on the three bump steps (3/40 = 7.5 % if it were spread evenly) and a text strip of
one series.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import dlbhooks as dlb

STEPS, WIDTH, HEIGHT = 40, 3, 1.5


def series(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` [n, STEPS, 1], labels [n], bump start per series (-1 without a bump)."""
    x = 0.5 * torch.randn(n, STEPS, 1, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    start = torch.randint(0, STEPS - WIDTH + 1, (n,), generator=gen)
    start[y == 0] = -1
    for i in torch.nonzero(y).flatten().tolist():
        x[i, start[i]:start[i] + WIDTH, 0] += HEIGHT
    return x, y, start


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(1, 16, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def train(seed: int) -> tuple[nn.Module, torch.Generator]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Detector()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(400):
        x, y, _ = series(128, gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval(), gen


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model, gen = train(args.seed)
    x, y, start = series(200, gen)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    accuracy = (pred == y).float().mean().item()
    print(f"LSTM bump detector: held-out accuracy {accuracy:.1%} on {len(y)} series")

    hits = torch.nonzero((pred == 1) & (y == 1)).flatten()
    exp = dlb.explain(model, x[hits], target=1, saturation=False)
    R = exp.inputs["x"][..., 0].abs()  # [series, steps]
    bump = torch.zeros_like(R, dtype=torch.bool)
    for row, i in enumerate(hits.tolist()):
        bump[row, start[i]:start[i] + WIDTH] = True
    share = ((R * bump).sum(1) / R.sum(1)).mean().item()
    print(f"share of |relevance| on the {WIDTH} bump steps, mean over {len(hits)} detected "
          f"series: {share:.1%} (evenly spread: {WIDTH / STEPS:.1%})")

    row = 0
    levels = " .:-=+*#%@"
    strip = "".join(levels[min(9, int(9.999 * v))] for v in (R[row] / R[row].max()).tolist())
    marks = "".join("^" if b else " " for b in bump[row].tolist())
    print(f"\nrelevance per step of series {int(hits[row])} (darker = more), bump marked:")
    print(f"  |{strip}|\n   {marks}")
    print(f"\nconservation: largest ledger error {exp.conservation_error():.1e} of the seed")
    return {"accuracy": accuracy, "share": share, "detected": len(hits),
            "conservation_error": exp.conservation_error()}


if __name__ == "__main__":
    main()
