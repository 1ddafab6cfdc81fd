"""Every module type the core issue lists: has a rule, explains, conserves in both modes."""

import pytest
import torch
from helpers import assert_conserved
from torch import nn

import dlbhooks as dlb

torch.manual_seed(0)


class Seq(nn.Module):
    """Run ``body`` on the input, then a Linear head on the flattened result."""

    def __init__(self, body: nn.Module, width: int, pick=None):
        super().__init__()
        self.body, self.pick = body, pick
        self.flat = nn.Flatten()
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        h = self.body(x)
        if self.pick is not None:
            h = self.pick(h)
        return self.head(self.flat(h))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.bil = nn.Bilinear(4, 5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, a, b):
        return self.head(self.bil(a, b))


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8 * 5, 3)

    def forward(self, x):
        out, _ = self.attn(x, x, x)
        return self.head(out.flatten(1))


def r(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def img(*shape):
    return torch.rand(*shape, dtype=torch.float64) * 2 - 0.5


CASES = {
    "Linear": (Seq(nn.Linear(6, 5), 5), r(2, 6)),
    "Bilinear": (TwoInputs(), (r(2, 4), r(2, 5))),
    "Conv1d": (Seq(nn.Conv1d(2, 3, 3, padding=1), 3 * 7), r(2, 2, 7)),
    "Conv2d": (Seq(nn.Conv2d(2, 3, 3, stride=2, padding=1), 3 * 16), r(2, 2, 7, 7)),
    "Conv3d": (Seq(nn.Conv3d(1, 2, 2), 2 * 27), r(2, 1, 4, 4, 4)),
    "ConvTranspose1d": (Seq(nn.ConvTranspose1d(2, 3, 3, stride=2), 3 * 11), r(2, 2, 5)),
    "ConvTranspose2d": (Seq(nn.ConvTranspose2d(2, 2, 3, stride=2, output_padding=1), 2 * 144),
                        r(2, 2, 5, 5)),
    "MaxPool1d": (Seq(nn.MaxPool1d(2), 2 * 4), r(2, 2, 8)),
    "MaxPool2d": (Seq(nn.MaxPool2d(3, stride=2, padding=1), 2 * 16), r(2, 2, 7, 7)),
    "AvgPool1d": (Seq(nn.AvgPool1d(3, stride=2), 2 * 3), img(2, 2, 8)),
    "AvgPool2d": (Seq(nn.AvgPool2d(2), 2 * 9), img(2, 2, 6, 6)),
    "AdaptiveMaxPool1d": (Seq(nn.AdaptiveMaxPool1d(3), 2 * 3), r(2, 2, 7)),
    "AdaptiveMaxPool2d": (Seq(nn.AdaptiveMaxPool2d((2, 3)), 2 * 6), r(2, 2, 5, 7)),
    "AdaptiveAvgPool1d": (Seq(nn.AdaptiveAvgPool1d(3), 2 * 3), img(2, 2, 7)),
    "AdaptiveAvgPool2d": (Seq(nn.AdaptiveAvgPool2d((3, 2)), 2 * 6), img(2, 2, 7, 5)),
    "BatchNorm1d": (Seq(nn.BatchNorm1d(4), 4), r(3, 4)),
    "BatchNorm2d": (Seq(nn.BatchNorm2d(2), 2 * 9), r(2, 2, 3, 3)),
    "LayerNorm": (Seq(nn.LayerNorm(5), 5), r(2, 5)),
    "GroupNorm": (Seq(nn.GroupNorm(2, 4), 4 * 4), r(2, 4, 2, 2)),
    "Embedding": (Seq(nn.Embedding(10, 4), 3 * 4), torch.tensor([[1, 2, 3], [4, 5, 1]])),
    "EmbeddingBag": (Seq(nn.EmbeddingBag(10, 4, mode="mean"), 4),
                     torch.tensor([[1, 2, 3], [4, 5, 1]])),
    "ReLU": (Seq(nn.Sequential(nn.Linear(4, 5), nn.ReLU()), 5), r(2, 4)),
    "LeakyReLU": (Seq(nn.Sequential(nn.Linear(4, 5), nn.LeakyReLU(0.1)), 5), r(2, 4)),
    "ELU": (Seq(nn.Sequential(nn.Linear(4, 5), nn.ELU()), 5), r(2, 4)),
    "GELU": (Seq(nn.Sequential(nn.Linear(4, 5), nn.GELU()), 5), r(2, 4)),
    "SiLU": (Seq(nn.Sequential(nn.Linear(4, 5), nn.SiLU()), 5), r(2, 4) * 5),
    "Tanh": (Seq(nn.Sequential(nn.Linear(4, 5), nn.Tanh()), 5), r(2, 4) * 5),
    "Sigmoid": (Seq(nn.Sequential(nn.Linear(4, 5), nn.Sigmoid()), 5), r(2, 4) * 5),
    "Softmax": (Seq(nn.Sequential(nn.Linear(4, 5), nn.Softmax(dim=-1)), 5), r(2, 4)),
    "Hardswish": (Seq(nn.Sequential(nn.Linear(4, 5), nn.Hardswish()), 5), r(2, 4)),
    "Hardsigmoid": (Seq(nn.Sequential(nn.Linear(4, 5), nn.Hardsigmoid()), 5), r(2, 4)),
    "Dropout": (Seq(nn.Dropout(0.5), 4), r(2, 4)),
    "Identity": (Seq(nn.Identity(), 4), r(2, 4)),
    "Flatten": (Seq(nn.Flatten(), 6), r(2, 2, 3)),
    "Unflatten": (Seq(nn.Unflatten(1, (2, 3)), 6), r(2, 6)),
    "LSTM": (Seq(nn.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True), 5 * 8,
                 pick=lambda h: h[0]), r(2, 5, 3)),
    "LSTM (seq first)": (Seq(nn.LSTM(3, 4), 4, pick=lambda h: h[0][-1]), r(5, 2, 3)),
    "GRU": (Seq(nn.GRU(3, 4, num_layers=2, batch_first=True, bidirectional=True), 5 * 8,
                pick=lambda h: h[0]), r(2, 5, 3)),
    "MultiheadAttention": (MHA(), r(2, 5, 8)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_listed_module_conserves(name, mode):
    model, x = CASES[name]
    model = model.double().eval()
    assert dlb.coverage(model).complete, dlb.coverage(model)
    exp = dlb.explain(model, x, mode=mode)
    assert_conserved(exp)
    for t in exp.inputs.values():
        assert torch.isfinite(t).all()
    seeded = exp.ledger[0].relevance_out
    total_in = exp.ledger[0].relevance_in
    if mode == "default":
        assert seeded == pytest.approx(100.0 * 2 if name != "BatchNorm1d" else 300.0, rel=1e-12)
        assert abs(total_in) > 0
        # where the 100 went: inputs + everything absorbed = seeded
        assert exp.total_input + exp.total_absorbed == pytest.approx(seeded, rel=1e-12)
