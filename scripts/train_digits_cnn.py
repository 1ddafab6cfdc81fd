"""Train the demo CNN on scikit-learn's bundled 8×8 digits (offline) and write
dlbhooks/assets/digits_cnn.safetensors. Needs scikit-learn (not a runtime dependency).

    python scripts/train_digits_cnn.py
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dlbhooks.demo import ASSET, DigitsCNN

OUT = Path(__file__).resolve().parents[1] / "dlbhooks" / "assets" / ASSET


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    idx_tr, idx_te = train_test_split(range(len(y)), test_size=0.25, random_state=0,
                                      stratify=digits.target)
    xtr, ytr, xte, yte = x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _epoch in range(40):
        model.train()
        perm = torch.randperm(len(ytr))
        for i in range(0, len(perm), 64):
            b = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(xtr[b]), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(xte).argmax(-1) == yte).float().mean())
    print(f"held-out accuracy: {acc:.4f} on {len(yte)} images")
    keep = torch.cat([torch.nonzero(yte == d)[:2, 0] for d in range(10)])
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors["images"] = xte[keep].contiguous()
    tensors["labels"] = yte[keep].contiguous()
    meta = {"dataset": "sklearn.datasets.load_digits (8x8, scaled to [0, 1])",
            "test_accuracy": round(acc, 4), "test_size": len(yte), "seed": 0}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata={"dlbhooks_demo": json.dumps(meta)})
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
