"""The digits CNN that ships with dlbhooks: a CNN trained on scikit-learn's 8×8 digits
(``scripts/train_digits_cnn.py``), with held-out sample images, for ``dlbhooks demo --model
digits``. (The default demo explains the shipped tiny MoE language model,
:mod:`dlbhooks.tiny_moe`.)"""

from __future__ import annotations

import json
from importlib import resources

import torch
from torch import nn

ASSET = "digits_cnn.safetensors"


class DigitsCNN(nn.Module):
    """Conv(1→8) ReLU Conv(8→16) ReLU MaxPool Flatten Linear(256→32) ReLU Linear(32→10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


def load_digits_model() -> tuple[DigitsCNN, torch.Tensor, torch.Tensor, dict]:
    """The trained model (eval mode), held-out images [N, 1, 8, 8], their labels, metadata."""
    from safetensors import safe_open

    path = resources.files("dlbhooks") / "assets" / ASSET
    with resources.as_file(path) as p, safe_open(str(p), framework="pt") as f:
        meta = json.loads(f.metadata()["dlbhooks_demo"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = DigitsCNN()
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items()
                           if k.startswith("model.")})
    return model.eval(), tensors["images"], tensors["labels"], meta
