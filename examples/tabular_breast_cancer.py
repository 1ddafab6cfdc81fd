"""Which measurements drove a tabular classifier's decision? Offline, in a few seconds.

    pip install scikit-learn
    python examples/tabular_breast_cancer.py [--seed 0]

Trains a small MLP (30 standardised features → 64 → 32 → 2, with batch norm) on
scikit-learn's bundled breast-cancer data set, then explains the held-out predictions with
DLBacktrace:

* default mode: each feature's share of the 100 units of relevance seeded at the
  predicted class, per patient and averaged over the test set;
* contrastive mode: the evidence for the predicted class (R+) against the evidence for the
  other class (R-), per feature, for one patient;
* the audit trail: every unit of relevance accounted for, per layer (inputs + absorbed by
  biases = seed), from the explanation's ledger.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import dlbhooks as dlb


def data(seed: int):
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    ds = load_breast_cancer()
    Xtr, Xte, ytr, yte = train_test_split(ds.data, ds.target, test_size=0.25,
                                          random_state=seed, stratify=ds.target)
    mean, std = Xtr.mean(0), Xtr.std(0)
    scale = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return (scale(Xtr), torch.tensor(ytr), scale(Xte), torch.tensor(yte),
            list(ds.feature_names), list(ds.target_names))


def train(X: torch.Tensor, y: torch.Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(X.shape[1], 64), nn.BatchNorm1d(64), nn.ReLU(),
                          nn.Dropout(0.1), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(150):  # full batch: 426 rows
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return model.eval()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    Xtr, ytr, Xte, yte, features, classes = data(args.seed)
    model = train(Xtr, ytr, args.seed)
    with torch.no_grad():
        pred = model(Xte).argmax(-1)
    accuracy = (pred == yte).float().mean().item()
    print(f"MLP on breast cancer (Wisconsin): held-out accuracy {accuracy:.1%} "
          f"({len(yte)} patients)")

    # default mode: the whole test set in one vectorised pass (target = each row's argmax)
    exp = dlb.explain(model, Xte, saturation=False)
    R = exp.inputs["input"]  # [patients, 30 features]: the 100 per row less the biases' part
    share = R.mean(0)
    print("\nfeatures by mean relevance over the test set (default mode, of 100 per patient):")
    for i in share.argsort(descending=True)[:8].tolist():
        print(f"  {features[i]:<24} {share[i]:6.2f}")

    # contrastive mode for one patient: evidence for the prediction against the other class
    k = 0
    c = dlb.explain(model, Xte[k:k + 1], mode="contrastive", saturation=False)
    pos, neg = c.positive["input"][0], c.negative["input"][0]
    net = pos - neg
    print(f"\npatient {k}: predicted {classes[pred[k]]}, label {classes[yte[k]]}; "
          "features with the most net evidence for the prediction (R+ - R-):")
    for i in net.argsort(descending=True)[:5].tolist():
        print(f"  {features[i]:<24} R+ {pos[i]:7.2f}   R- {neg[i]:7.2f}")

    # the audit trail: per layer, relevance in = relevance passed on + absorbed
    seed_total = 100.0 * len(yte)
    absorbed = sum(exp.absorbed.values())
    print(f"\nconservation over the test set: seed {seed_total:.1f} = inputs "
          f"{exp.total_input:.4f} + absorbed by biases {absorbed:.4f} "
          f"(difference {seed_total - exp.total_input - absorbed:+.1e})")
    worst = exp.conservation_error()
    print(f"largest per-layer error in the ledger, relative to the seed: {worst:.1e}")
    return {"accuracy": accuracy, "relevance": R, "net": net, "worst_residual": worst,
            "seed_total": seed_total, "input_total": exp.total_input, "absorbed": absorbed}


if __name__ == "__main__":
    main()
