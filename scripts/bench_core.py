"""Explanation cost ÷ plain forward cost on CPU, for an MLP, ResNet-18 (224×224) and an LSTM.

Explanation time = recorded forward (hooks on) + reverse pass. The default rule needs, per
layer, the forward, one product for the denominators (|a|·|W|ᵀ) and one for the reverse
step, so about 3× is the floor (target ≤ 4 for the MLP and CNN; ≤ 6 for the LSTM, whose
rule recomputes the gates).

    python scripts/bench_core.py [--threads 2] [--repeats 5] [--saturation]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import dlbhooks as dlb


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1000, 128)
        self.lstm = nn.LSTM(128, 256, batch_first=True)
        self.head = nn.Linear(256, 10)

    def forward(self, ids):
        out, _ = self.lstm(self.emb(ids))
        return self.head(out[:, -1])


def _trained_like(model: nn.Module) -> nn.Module:
    """Batch norms with the statistics and affine parameters of a trained network (fresh
    ones have beta = 0, so the rule would never pay for beta's share)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def models():
    mlp = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                        nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    yield "MLP 512-1024x3-10, batch 64", mlp, torch.randn(64, 512)
    try:
        from torchvision.models import resnet18
        yield "ResNet-18 1x3x224x224", _trained_like(resnet18(weights=None)), \
            torch.randn(1, 3, 224, 224)
    except ImportError:
        print("torchvision not installed: skipping ResNet-18")
    yield "LSTM 128->256, batch 8 x 64 steps", LSTMClassifier(), torch.randint(0, 1000, (8, 64))


def interleaved(forward, explain, repeats):
    """Times of both, alternating runs (so that load from other work on the machine hits
    both alike); ``explain`` returns the time its recorded forward took."""
    forward(), explain()  # warm-up
    f, e, r = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward()
        f.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r.append(explain())
        e.append(time.perf_counter() - t0)
    return f, e, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--saturation", action="store_true", help="saturation on (default off)")
    ap.add_argument("--mode", default="default")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, mode={args.mode}, "
          f"saturation={args.saturation}")
    print("times: median (and fastest) of the runs, forward and explanation alternating; "
          "'recorded' is the traced forward's share of the ratio")
    print(f"{'model':<36} {'forward ms':>11} {'explain ms':>11} {'ratio':>7} "
          f"{'recorded':>9} {'min fwd':>8} {'min exp':>8} {'ratio':>6}")
    for name, model, x in models():
        model.eval()

        def forward():
            with torch.no_grad():
                model(x)

        def explain():
            t0 = time.perf_counter()
            with dlb.trace(model) as tape:
                model(x)
            recorded = time.perf_counter() - t0
            tape.explain(mode=args.mode, saturation=args.saturation, keep=False)
            return recorded

        fs, es, rs = interleaved(forward, explain, args.repeats)
        f, e, r = statistics.median(fs), statistics.median(es), statistics.median(rs)
        fm, em = min(fs), min(es)
        print(f"{name:<36} {f * 1e3:11.1f} {e * 1e3:11.1f} {e / f:7.2f} {r / f:9.2f} "
              f"{fm * 1e3:8.1f} {em * 1e3:8.1f} {em / fm:6.2f}")


if __name__ == "__main__":
    main()
