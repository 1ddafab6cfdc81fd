"""Golden results: explain a fixed set of tiny models in both modes and write what comes out.

Every family and classic net the test suite covers (MLP, CNN, the reference fixtures' nets,
LSTM, GRU, ``nn.MultiheadAttention`` models, one model per listed ``nn`` module type, the
torchvision families at tiny widths, the transformers families with padded batches, the MoE
families, JetMoE, the shipped tiny MoE and two generations) is built deterministically in
float64, explained in default mode (``saturation=True``, the default) and in contrastive
mode, and written to ``tests/golden/<case>.safetensors``: the model's weights (rounded to
float16 — float32 for the reference fixtures' nets and the digits CNN — before explaining,
so that the file holds them exactly and stays small; the shipped tiny MoE is identified by
the sha256 of its asset instead), the inputs, and the results: input relevance (both
streams in contrastive mode), ``experts``, ``heads``, routing, ``layers``, ``absorbed``,
``blocks`` and the ledger (every call's relevance out / in / absorbed / absorbed inside),
with the resolved targets, the tables' keys and a fingerprint of the machine (torch and
library versions, thread count, CPU model, platform) in the JSON metadata.

The cases' configurations repeat the test suite's on purpose instead of importing them:
a golden case must not change when a test's model does.

``tests/test_golden.py`` rebuilds each case, loads the stored weights and inputs, explains
again and compares: bitwise when the fingerprint matches the machine, else to 1e-13
relative to the seeded relevance.

    python scripts/write_golden.py                 # every case (idempotent)
    python scripts/write_golden.py --only 'moe_*'  # one case or a glob of cases
    python scripts/write_golden.py --list
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import dlbhooks as dlb

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
FIXTURES = ROOT / "tests" / "fixtures"
THREADS = min(2, torch.get_num_threads())  # as tests/conftest.py
DT = torch.float64
MODES = ("default", "contrastive")
FORMAT = 1


# -- cases --------------------------------------------------------------------------------


@dataclass
class Case:
    """One model and its inputs. ``kind``: ``"explain"`` (trace ``model(**inputs)``, then
    ``tape.explain(mode=m, **explain)``) or ``"generation"`` (``dlb.explain_generation``
    of ``inputs["prompt"]`` with ``explain`` as keyword arguments)."""

    model: nn.Module
    inputs: dict[str, Tensor]
    explain: dict[str, Any] = field(default_factory=dict)
    kind: str = "explain"
    asset: Path | None = None  # weights not stored: this file's sha256 is recorded instead
    weights: torch.dtype = torch.float16  # dtype the weights are rounded to and stored in
    note: str = ""


CASES: dict[str, Callable[[], Case]] = {}


def case(name: str) -> Callable[[Callable[[], Case]], Callable[[], Case]]:
    """Register a case builder under ``name``."""

    def deco(fn: Callable[[], Case]) -> Callable[[], Case]:
        CASES[name] = fn
        return fn
    return deco


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=DT) * scale


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial γ, β and running statistics for every BatchNorm (as the suite does)."""
    g = gen(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


# classic nets ------------------------------------------------------------------------------


@case("mlp")
def _mlp() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    return Case(model.to(DT).eval(), {"input": randn(4, 6, seed=1, scale=2.0)})


@case("cnn_bn_pool")
def _cnn() -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 5),
    )
    return Case(randomise_bn(model).to(DT).eval(), {"input": randn(2, 3, 8, 8, seed=1)})


def _fixture_net(arch: list) -> nn.Sequential:
    layers: list[nn.Module] = []
    for kind, *args in arch:
        if kind == "linear":
            layers.append(nn.Linear(*args))
        elif kind == "relu":
            layers.append(nn.ReLU())
        elif kind == "conv2d":
            cin, cout, k, stride, pad = args
            layers.append(nn.Conv2d(cin, cout, k, stride=stride, padding=pad))
        elif kind == "flatten":
            layers.append(nn.Flatten())
        else:
            raise ValueError(kind)
    return nn.Sequential(*layers)


def _fixture_case(name: str) -> Callable[[], Case]:
    def build() -> Case:
        from safetensors.torch import load_file

        meta = json.loads((FIXTURES / f"{name}.json").read_text())
        t = load_file(str(FIXTURES / f"{name}.safetensors"))
        model = _fixture_net(meta["architecture"])
        model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
        return Case(model.to(DT).eval(), {"input": t["input"].to(DT)},
                    {"target": meta["target"], "multiplier": meta["multiplier"]},
                    weights=torch.float32,
                    note="the reference fixture's net, weights and input (tests/fixtures)")
    return build


for _fx in ("mlp_relu", "mlp_deep", "cnn_small"):
    case(f"fixture_{_fx}")(_fixture_case(_fx))


@case("digits_cnn")
def _digits() -> Case:
    from dlbhooks.demo import load_digits_model

    model, images, _, _ = load_digits_model()
    return Case(model.to(DT).eval(), {"image": images[:2].to(DT)}, weights=torch.float32,
                note="the shipped digits CNN (its weights are stored here too)")


class RNNHead(nn.Module):
    """RNN -> last step of the output sequence -> Linear (as tests/test_recurrent.py)."""

    def __init__(self, cls: type[nn.Module], batch_first: bool) -> None:
        super().__init__()
        self.rnn = cls(4, 3, num_layers=2, bidirectional=True, batch_first=batch_first)
        self.fc = nn.Linear(6, 5)
        self.batch_first = batch_first

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.fc(out[:, -1] if self.batch_first else out[-1])


def _rnn_case(cls: type[nn.Module], batch_first: bool) -> Case:
    torch.manual_seed(0)
    model = RNNHead(cls, batch_first)
    with torch.no_grad():
        for p in model.rnn.parameters():  # large enough that gates saturate now and then
            p.mul_(2.5)
    x = randn(2, 5, 4, seed=1, scale=1.5)
    x = x if batch_first else x.transpose(0, 1).contiguous()
    return Case(model.to(DT).eval(), {"x": x})


case("lstm")(lambda: _rnn_case(nn.LSTM, True))
case("gru")(lambda: _rnn_case(nn.GRU, False))


class SelfAttnNet(nn.Module):
    """Linear -> self-attention with key padding -> Tanh -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(5, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.act = nn.Tanh()
        self.flat = nn.Flatten()
        self.head = nn.Linear(8 * 3, 3)

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        h = self.emb(x)
        a, _ = self.mha(h, h, h, key_padding_mask=pad, need_weights=True)
        return self.head(self.flat(self.act(a)))


class CrossAttnNet(nn.Module):
    """Cross-attention (kdim, vdim, bias_kv, zero_attn) with a boolean mask -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.q_emb = nn.Linear(5, 8)
        self.k_emb = nn.Linear(7, 6)
        self.mha = nn.MultiheadAttention(8, 2, kdim=6, vdim=7, batch_first=True,
                                         add_bias_kv=True, add_zero_attn=True)
        self.flat = nn.Flatten()
        self.head = nn.Linear(8 * 3, 3)

    def forward(self, x: Tensor, mem: Tensor, mask: Tensor) -> Tensor:
        a, _ = self.mha(self.q_emb(x), self.k_emb(mem), mem, attn_mask=mask, need_weights=False)
        return self.head(self.flat(a))


def _randomised(model: nn.Module) -> nn.Module:
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.6)
    return model.to(DT).eval()


@case("mha_self")
def _mha_self() -> Case:
    torch.manual_seed(0)
    pad = torch.tensor([[False, False, False], [False, False, True]])
    return Case(_randomised(SelfAttnNet()), {"x": randn(2, 3, 5, seed=1), "pad": pad})


@case("mha_cross")
def _mha_cross() -> Case:
    torch.manual_seed(0)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[1, :2] = True
    return Case(_randomised(CrossAttnNet()),
                {"x": randn(2, 3, 5, seed=1), "mem": randn(2, 4, 7, seed=2), "mask": mask})


# one model per module type of tests/test_coverage.py ------------------------------------------


class Seq(nn.Module):
    """Run ``body`` on the input (optionally pick one output), then a Linear head."""

    def __init__(self, body: nn.Module, width: int, pick: str | None = None) -> None:
        super().__init__()
        self.body, self.pick = body, pick
        self.flat = nn.Flatten()
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        if self.pick == "seq":
            h = h[0]
        elif self.pick == "last":
            h = h[0][-1]
        return self.head(self.flat(h))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bil = nn.Bilinear(4, 5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.head(self.bil(a, b))


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8 * 5, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attn(x, x, x)
        return self.head(out.flatten(1))


def _act(m: nn.Module) -> Callable[[], tuple[nn.Module, int]]:
    return lambda: (nn.Sequential(nn.Linear(4, 5), m), 5)


# name -> (builder of (body, head width) or a whole model, input shape, input scale)
ZOO: dict[str, tuple[Callable[[], Any], tuple[int, ...], float]] = {
    "linear": (lambda: (nn.Linear(6, 5), 5), (2, 6), 1.0),
    "bilinear": (TwoInputs, (), 1.0),
    "conv1d": (lambda: (nn.Conv1d(2, 3, 3, padding=1), 3 * 7), (2, 2, 7), 1.0),
    "conv2d": (lambda: (nn.Conv2d(2, 3, 3, stride=2, padding=1), 3 * 16), (2, 2, 7, 7), 1.0),
    "conv3d": (lambda: (nn.Conv3d(1, 2, 2), 2 * 27), (2, 1, 4, 4, 4), 1.0),
    "conv_transpose1d": (lambda: (nn.ConvTranspose1d(2, 3, 3, stride=2), 3 * 11), (2, 2, 5),
                         1.0),
    "conv_transpose2d": (lambda: (nn.ConvTranspose2d(2, 2, 3, stride=2, output_padding=1),
                                  2 * 144), (2, 2, 5, 5), 1.0),
    "max_pool1d": (lambda: (nn.MaxPool1d(2), 2 * 4), (2, 2, 8), 1.0),
    "max_pool2d": (lambda: (nn.MaxPool2d(3, stride=2, padding=1), 2 * 16), (2, 2, 7, 7), 1.0),
    "avg_pool1d": (lambda: (nn.AvgPool1d(3, stride=2), 2 * 3), (2, 2, 8), -1.0),
    "avg_pool2d": (lambda: (nn.AvgPool2d(2), 2 * 9), (2, 2, 6, 6), -1.0),
    "adaptive_max_pool1d": (lambda: (nn.AdaptiveMaxPool1d(3), 2 * 3), (2, 2, 7), 1.0),
    "adaptive_max_pool2d": (lambda: (nn.AdaptiveMaxPool2d((2, 3)), 2 * 6), (2, 2, 5, 7), 1.0),
    "adaptive_avg_pool1d": (lambda: (nn.AdaptiveAvgPool1d(3), 2 * 3), (2, 2, 7), -1.0),
    "adaptive_avg_pool2d": (lambda: (nn.AdaptiveAvgPool2d((3, 2)), 2 * 6), (2, 2, 7, 5), -1.0),
    "batch_norm1d": (lambda: (nn.BatchNorm1d(4), 4), (3, 4), 1.0),
    "batch_norm2d": (lambda: (nn.BatchNorm2d(2), 2 * 9), (2, 2, 3, 3), 1.0),
    "layer_norm": (lambda: (nn.LayerNorm(5), 5), (2, 5), 1.0),
    "group_norm": (lambda: (nn.GroupNorm(2, 4), 4 * 4), (2, 4, 2, 2), 1.0),
    "embedding": (lambda: (nn.Embedding(10, 4), 3 * 4), (), 1.0),
    "embedding_bag": (lambda: (nn.EmbeddingBag(10, 4, mode="mean"), 4), (), 1.0),
    "relu": (_act(nn.ReLU()), (2, 4), 1.0),
    "leaky_relu": (_act(nn.LeakyReLU(0.1)), (2, 4), 1.0),
    "elu": (_act(nn.ELU()), (2, 4), 1.0),
    "gelu": (_act(nn.GELU()), (2, 4), 1.0),
    "silu": (_act(nn.SiLU()), (2, 4), 5.0),
    "tanh": (_act(nn.Tanh()), (2, 4), 5.0),
    "sigmoid": (_act(nn.Sigmoid()), (2, 4), 5.0),
    "softmax": (_act(nn.Softmax(dim=-1)), (2, 4), 1.0),
    "hardswish": (_act(nn.Hardswish()), (2, 4), 1.0),
    "hardsigmoid": (_act(nn.Hardsigmoid()), (2, 4), 1.0),
    "dropout": (lambda: (nn.Dropout(0.5), 4), (2, 4), 1.0),
    "identity": (lambda: (nn.Identity(), 4), (2, 4), 1.0),
    "flatten": (lambda: (nn.Flatten(), 6), (2, 2, 3), 1.0),
    "unflatten": (lambda: (nn.Unflatten(1, (2, 3)), 6), (2, 6), 1.0),
    "lstm": (lambda: (nn.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=True),
                      5 * 8, "seq"), (2, 5, 3), 1.0),
    "lstm_seq_first": (lambda: (nn.LSTM(3, 4), 4, "last"), (5, 2, 3), 1.0),
    "gru": (lambda: (nn.GRU(3, 4, num_layers=2, batch_first=True, bidirectional=True),
                     5 * 8, "seq"), (2, 5, 3), 1.0),
    "multihead_attention": (MHA, (2, 5, 8), 1.0),
}


def _zoo_case(name: str) -> Callable[[], Case]:
    make, shape, scale = ZOO[name]

    def build() -> Case:
        torch.manual_seed(0)
        made = make()
        model = made if isinstance(made, nn.Module) else Seq(*made)
        model = randomise_bn(model).to(DT).eval()
        if name == "bilinear":
            inputs = {"a": randn(2, 4, seed=1), "b": randn(2, 5, seed=2)}
        elif name.startswith("embedding"):
            inputs = {"x": torch.tensor([[1, 2, 3], [4, 5, 1]])}
        elif scale < 0:  # pooling tests use mostly positive inputs
            inputs = {"x": torch.rand(*shape, generator=gen(1), dtype=DT) * 2 - 0.5}
        else:
            inputs = {"x": randn(*shape, seed=1, scale=scale)}
        return Case(model, inputs)
    return build


for _z in ZOO:
    case(f"zoo_{_z}")(_zoo_case(_z))


# torchvision at tiny widths -------------------------------------------------------------------


def _image(n: int = 1, size: int = 16) -> Tensor:
    return randn(n, 3, size, size, seed=1)


def _tiny_resnet(block: type[nn.Module], planes: tuple[int, ...]) -> nn.Module:
    """torchvision's ResNet class and blocks with small widths (its constructor fixes 64)."""
    from torchvision.models import ResNet

    m = ResNet.__new__(ResNet)
    nn.Module.__init__(m)
    m._norm_layer, m.inplanes, m.dilation, m.groups, m.base_width = nn.BatchNorm2d, planes[0], \
        1, 1, 64
    m.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
    m.bn1 = nn.BatchNorm2d(planes[0])
    m.relu = nn.ReLU(inplace=True)
    m.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    m.layer1 = m._make_layer(block, planes[0], 2)
    m.layer2 = m._make_layer(block, planes[1], 1, stride=2)
    m.layer3 = m._make_layer(block, planes[2], 1, stride=2)
    m.layer4 = m._make_layer(block, planes[3], 1, stride=2)
    m.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    m.fc = nn.Linear(planes[3] * block.expansion, 10)
    return m


def _tv(build: Callable[[], nn.Module], size: int = 16) -> Callable[[], Case]:
    def make() -> Case:
        torch.manual_seed(0)
        return Case(randomise_bn(build()).to(DT).eval(), {"x": _image(size=size)})
    return make


def _resnet_basic() -> nn.Module:
    from torchvision.models.resnet import BasicBlock

    return _tiny_resnet(BasicBlock, (8, 16, 16, 16))


def _resnet_bottleneck() -> nn.Module:
    from torchvision.models.resnet import Bottleneck

    return _tiny_resnet(Bottleneck, (4, 8, 8, 8))


def _vgg(bn: bool) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import VGG
        from torchvision.models.vgg import make_layers

        m = VGG.__new__(VGG)  # the constructor would build a 4096-wide classifier
        nn.Module.__init__(m)
        m.features = make_layers([8, "M", 16, 16, "M"], batch_norm=bn)
        m.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        m.classifier = nn.Sequential(nn.Linear(16 * 49, 16), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(),
                                     nn.Linear(16, 10))
        return m
    return build


def _densenet() -> nn.Module:
    from torchvision.models import DenseNet

    return DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                    num_classes=10)


def _mobilenet_v2() -> nn.Module:
    from torchvision.models import MobileNetV2

    return MobileNetV2(num_classes=10, width_mult=0.25,
                       inverted_residual_setting=[[1, 8, 1, 1], [2, 8, 2, 1], [2, 16, 1, 2]])


def _mobilenet_v3() -> nn.Module:
    from torchvision.models.mobilenetv3 import InvertedResidualConfig as C
    from torchvision.models.mobilenetv3 import MobileNetV3

    setting = [C(8, 3, 8, 8, True, "RE", 2, 1, 1.0), C(8, 3, 16, 8, False, "RE", 1, 1, 1.0),
               C(8, 5, 16, 16, True, "HS", 2, 1, 1.0), C(16, 5, 32, 16, True, "HS", 1, 1, 1.0)]
    return MobileNetV3(setting, last_channel=32, num_classes=10)


def _efficientnet_v1() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, MBConvConfig

    setting = [MBConvConfig(1, 3, 1, 8, 8, 1), MBConvConfig(2, 3, 2, 8, 16, 2)]
    return EfficientNet(setting, dropout=0.2, num_classes=10)


def _efficientnet_v2() -> nn.Module:
    from functools import partial

    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    setting = [FusedMBConvConfig(1, 3, 1, 8, 8, 2), FusedMBConvConfig(4, 3, 2, 8, 16, 1),
               MBConvConfig(2, 3, 2, 16, 16, 2)]
    return EfficientNet(setting, dropout=0.2, num_classes=10, last_channel=32,
                        norm_layer=partial(nn.BatchNorm2d, eps=1e-3))


case("tv_resnet_basic")(_tv(_resnet_basic))
case("tv_resnet_bottleneck")(_tv(_resnet_bottleneck))
case("tv_vgg")(_tv(_vgg(False)))
case("tv_vgg_bn")(_tv(_vgg(True)))
case("tv_densenet")(_tv(_densenet))
case("tv_mobilenet_v2")(_tv(_mobilenet_v2))
case("tv_mobilenet_v3")(_tv(_mobilenet_v3))
case("tv_efficientnet_v1")(_tv(_efficientnet_v1))
case("tv_efficientnet_v2")(_tv(_efficientnet_v2))


@case("tv_vit")
def _vit() -> Case:
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2,
                                             num_heads=2, hidden_dim=16, mlp_dim=32,
                                             num_classes=5)
    with torch.no_grad():  # torchvision zero-initialises the head, class token and biases
        for name, p in m.named_parameters():
            if name.endswith("bias") or name in ("class_token", "heads.head.weight"):
                p.normal_(0, 0.3)
    return Case(m.to(DT).eval(), {"x": _image(2)})


# transformers families (tests/test_transformers.py) -------------------------------------------

V = 64
DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
           pad_token_id=0)
ENC = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2,
           pad_token_id=0)
DECODERS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2"]
ENCODERS = ["bert", "roberta", "electra", "albert", "distilbert"]


def _hf_config(name: str) -> Any:
    import transformers as t

    if name == "llama":
        return t.LlamaConfig(**DEC)
    if name == "mistral":
        return t.MistralConfig(**DEC, sliding_window=4)
    if name == "qwen2":
        return t.Qwen2Config(**DEC)
    if name == "qwen3":
        return t.Qwen3Config(**DEC, head_dim=8)
    if name == "gemma2":
        return t.Gemma2Config(**DEC, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
    if name == "gemma3":
        return t.Gemma3TextConfig(**DEC, head_dim=8, query_pre_attn_scalar=8, sliding_window=4)
    if name == "phi3":
        return t.Phi3Config(**DEC, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                    "partial_rotary_factor": 0.5})
    if name == "gpt2":
        return t.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            pad_token_id=0)
    if name == "bert":
        return t.BertConfig(**ENC)
    if name == "roberta":
        return t.RobertaConfig(**{**ENC, "pad_token_id": 1})
    if name == "electra":
        return t.ElectraConfig(**ENC, embedding_size=16)
    if name == "albert":
        return t.AlbertConfig(**ENC, embedding_size=16)
    if name == "distilbert":
        return t.DistilBertConfig(vocab_size=V, dim=32, hidden_dim=48, n_layers=2, n_heads=4,
                                  max_position_embeddings=64, pad_token_id=0)
    raise KeyError(name)


def _padded_batch(name: str) -> tuple[Tensor, Tensor]:
    """2 × 7 ids; row 1 padded: left for decoders, right for encoders (as the suite does)."""
    ids = torch.randint(3, V, (2, 7), generator=gen(1))
    mask = torch.ones_like(ids)
    if name in ENCODERS:
        ids[1, -2:] = 1 if name == "roberta" else 0
        mask[1, -2:] = 0
    else:
        ids[1, :2] = 0
        mask[1, :2] = 0
    return ids, mask


def _hf_case(name: str, head: str) -> Callable[[], Case]:
    def build() -> Case:
        import transformers

        torch.manual_seed(0)
        cfg = _hf_config(name)
        cfg.num_labels = 3
        model = getattr(transformers, head).from_config(cfg).to(DT).eval()
        with torch.no_grad():  # non-trivial biases and norm weights
            for n, p in model.named_parameters():
                if n.endswith("bias") or "norm" in n.lower():
                    p.add_(0.1 * torch.randn_like(p))
        ids, mask = _padded_batch(name)
        kw = {"position": 2} if "MaskedLM" in head else {}
        return Case(model, {"input_ids": ids, "attention_mask": mask}, kw)
    return build


_HEADS = {"AutoModelForCausalLM": "clm", "AutoModelForSequenceClassification": "cls",
          "AutoModelForMaskedLM": "mlm"}
for _n in DECODERS:  # the Llama-like families share GenericForSequenceClassification
    for _h in ("AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        if _h == "AutoModelForCausalLM" or _n in ("llama", "gpt2"):
            case(f"hf_{_n}_{_HEADS[_h]}")(_hf_case(_n, _h))
for _n in ENCODERS:
    for _h in ("AutoModelForSequenceClassification", "AutoModelForMaskedLM"):
        case(f"hf_{_n}_{_HEADS[_h]}")(_hf_case(_n, _h))


# mixture of experts (tests/test_moe.py, tests/test_jetmoe.py) ---------------------------------

MOE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)


def _moe_config(name: str) -> Any:
    import transformers as t

    if name == "qwen3_moe":
        return t.Qwen3MoeConfig(**MOE, head_dim=8, intermediate_size=48,
                                moe_intermediate_size=16, num_experts=4,
                                num_experts_per_tok=2, decoder_sparse_step=1)
    if name == "olmoe":
        return t.OlmoeConfig(**MOE, intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    if name == "mixtral":
        return t.MixtralConfig(**MOE, intermediate_size=16, num_local_experts=4,
                               num_experts_per_tok=2)
    if name == "qwen2_moe":
        return t.Qwen2MoeConfig(**MOE, intermediate_size=48, moe_intermediate_size=16,
                                shared_expert_intermediate_size=24, num_experts=4,
                                num_experts_per_tok=2)
    if name == "gpt_oss":
        return t.GptOssConfig(**MOE, head_dim=8, intermediate_size=16, num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=4,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    raise KeyError(name)


def _moe_case(name: str) -> Callable[[], Case]:
    def build() -> Case:
        import transformers

        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_moe_config(name)).to(DT).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dim() == 1 or "bias" in n or "sinks" in n:
                    p.add_(0.05 * torch.randn_like(p))
        model.set_experts_implementation("eager")
        return Case(model, {"input_ids": torch.randint(0, 64, (2, 6), generator=gen(3))})
    return build


for _n in ("qwen3_moe", "olmoe", "mixtral", "qwen2_moe", "gpt_oss"):
    case(f"moe_{_n}")(_moe_case(_n))


def _jetmoe_case(cls: str, padded: bool) -> Callable[[], Case]:
    def build() -> Case:
        import transformers

        torch.manual_seed(0)
        cfg = transformers.JetMoeConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2,
            kv_channels=8, intermediate_size=16, max_position_embeddings=64,
            num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)
        model = getattr(transformers, cls)(cfg).to(DT).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dim() == 1 or "bias" in n:  # norms and the zero-initialised biases
                    p.add_(0.05 * torch.randn_like(p))
                elif "input_linear" in n or "output_linear" in n:
                    p.mul_(20)  # initializer_range 0.01 makes the experts vanishingly small
        inputs = {"input_ids": torch.randint(1, 64, (2, 6), generator=gen(3))}
        if padded:
            mask = torch.ones(2, 6, dtype=torch.long)
            mask[0, 4:] = 0
            inputs["attention_mask"] = mask
        return Case(model, inputs)
    return build


case("moe_jetmoe_clm")(_jetmoe_case("JetMoeForCausalLM", False))
case("moe_jetmoe_cls_padded")(_jetmoe_case("JetMoeForSequenceClassification", True))


@case("tiny_moe")
def _tiny_moe() -> Case:
    from dlbhooks.tiny_moe import asset_path, encode, load_tiny_moe

    model, _ = load_tiny_moe(dtype=DT)
    ids = encode("def f(x):", bos=True)[None]
    return Case(model, {"input_ids": ids}, asset=asset_path() / "model.safetensors",
                note="the shipped tiny MoE (weights not stored: sha256 of the asset)")


# generation (tests/test_generation.py) --------------------------------------------------------


def _generation_case(name: str) -> Callable[[], Case]:
    def build() -> Case:
        import transformers as t

        torch.manual_seed(0)
        if name == "llama":
            cfg = t.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64,
                                pad_token_id=0, eos_token_id=None, attention_bias=True)
            model = t.LlamaForCausalLM(cfg)
        else:
            cfg = t.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               pad_token_id=0, eos_token_id=None)
            model = t.GPT2LMHeadModel(cfg)
        model = model.to(DT).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias") or "norm" in n.lower() or ".ln_" in n:
                    p.add_(0.1 * torch.randn_like(p))
        prompt = torch.randint(3, V, (1, 5), generator=gen(1))
        return Case(model, {"prompt": prompt}, {"max_new_tokens": 4}, kind="generation")
    return build


case("generation_llama")(_generation_case("llama"))
case("generation_gpt2")(_generation_case("gpt2"))


# -- running a case -----------------------------------------------------------------------------


def fingerprint() -> dict[str, Any]:
    """What bitwise reproducibility depends on (besides dlbhooks itself)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    versions = {"torch": torch.__version__}
    for lib in ("transformers", "torchvision"):
        try:
            versions[lib] = __import__(lib).__version__
        except ImportError:
            versions[lib] = None
    return {**versions, "threads": torch.get_num_threads(), "cpu": cpu,
            "machine": platform.machine(), "platform": platform.platform(),
            "python": platform.python_version()}


#: fingerprint fields that must match for the bitwise comparison
BITWISE_KEYS = ("torch", "transformers", "torchvision", "threads", "cpu", "machine")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def round_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every floating parameter and buffer to ``dtype`` (the stored one), in place."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(dtype))


def weights_of(model: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """The state dict as stored: floats in ``dtype`` (exact after :func:`round_weights`)."""
    out = {}
    for k, t in model.state_dict().items():
        t = t.detach()
        out[k] = (t.to(dtype) if t.is_floating_point() else t).clone().contiguous()
    return out


def load_weights(model: nn.Module, stored: dict[str, Tensor]) -> None:
    """Load a stored state dict (strict: every key, every shape) into the float64 model."""
    model.load_state_dict(stored, strict=True)


def _streams(v: Any) -> list[float]:
    """A float or a (pos, neg) pair as a list of floats."""
    return [float(x) for x in v] if isinstance(v, tuple | list) else [float(v)]


def table(d: dict[str, Any]) -> tuple[list[str], Tensor]:
    """``{key: float | (pos, neg) | [such, ...]}`` as (keys, float64 tensor [n, ..., S]);
    a scalar among pairs is stored as (x, NaN), so scalars and pairs stay distinct."""
    keys = list(d)
    if not keys:
        return keys, torch.zeros(0, dtype=DT)
    rows = [[_streams(x) for x in v] if isinstance(v, list) else [_streams(v)]
            for v in d.values()]
    width = max((len(x) for r in rows for x in r), default=1)
    data = [[x + [math.nan] * (width - len(x)) for x in r] for r in rows]
    t = torch.tensor(data, dtype=DT).reshape(len(keys), -1, width)
    return keys, (t.squeeze(1) if all(not isinstance(v, list) for v in d.values()) else t)


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.tolist()
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    return v


def run(c: Case, release: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Explain a case in both modes: (tensors keyed ``"<mode>/<field>[/<key>]"``, JSON-able
    data: the resolved targets and the keys of the tables ``layers``, ``absorbed``,
    ``blocks`` (``"block::part"``) and ``ledger`` (rows: out, in, absorbed, absorbed inside
    of each call, one column per stream)). ``release``: one traced forward per mode,
    explained with ``release=True`` (the records freed behind the walk)."""
    tensors: dict[str, Tensor] = {}
    info: dict[str, Any] = {}
    if c.kind == "generation":
        for mode in MODES:
            g = dlb.explain_generation(c.model, c.inputs["prompt"], mode=mode, **c.explain)
            tensors[f"{mode}/ids"] = g.ids
            tensors[f"{mode}/matrix"] = g.matrix
            tensors[f"{mode}/absorbed"] = g.absorbed
            if g.positive is not None:
                tensors[f"{mode}/positive"] = g.positive
                tensors[f"{mode}/negative"] = g.negative
        return tensors, info
    with dlb.trace(c.model) as tape:
        c.model(**c.inputs)
    for mode in MODES:
        if release:
            with dlb.trace(c.model) as tape:
                c.model(**c.inputs)
        add_results(tensors, info, mode, tape.explain(mode=mode, release=release, **c.explain))
    return tensors, info


def add_results(tensors: dict[str, Tensor], info: dict[str, Any], mode: str,
                exp: dlb.Explanation) -> None:
    """Put what a golden file stores of one explanation (mode ``mode``) into ``tensors``
    and ``info``."""
    # contrastive inputs are positive - negative: the two streams are stored
    groups = {"inputs": exp.inputs if exp.positive is None else {},
              "positive": exp.positive or {}, "negative": exp.negative or {},
              "heads": exp.heads, "experts": exp.experts}
    for group, d in groups.items():
        for k, v in d.items():
            tensors[f"{mode}/{group}/{k}"] = v
    for k, (idx, w) in exp.routing.items():
        tensors[f"{mode}/routing_idx/{k}"] = idx
        tensors[f"{mode}/routing_w/{k}"] = w
    info[f"{mode}/target"] = _jsonable(exp.target)
    tables = {
        "layers": exp.layers, "absorbed": exp.absorbed,
        "blocks": {f"{k}::{n}": x for k, v in exp.blocks.items() for n, x in v.items()},
        "ledger": {e.key: [e.relevance_out, e.relevance_in, e.absorbed, e.absorbed_inside]
                   for e in exp.ledger},
    }
    for name, d in tables.items():
        info[f"{mode}/{name}"], tensors[f"{mode}/{name}"] = table(d)


def build(name: str) -> Case:
    """The case's model (float64, eval) and inputs, built deterministically."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        return CASES[name]()


def write(name: str, out_dir: Path = GOLDEN) -> Path:
    from safetensors.torch import save_file

    c = build(name)
    if c.asset is None:
        round_weights(c.model, c.weights)
    tensors, info = run(c)
    stored: dict[str, Tensor] = {}
    if c.asset is None:
        stored.update({f"weights/{k}": v for k, v in weights_of(c.model, c.weights).items()})
    stored.update({f"inputs/{k}": v.clone().contiguous() for k, v in c.inputs.items()})
    stored.update({f"results/{k}": v.detach().clone().contiguous() for k, v in tensors.items()})
    meta = {
        "format": FORMAT, "case": name, "kind": c.kind, "note": c.note,
        "explain": c.explain, "modes": list(MODES),
        "weights_dtype": None if c.asset is not None else str(c.weights),
        "asset_sha256": sha256(c.asset) if c.asset is not None else None,
        "fingerprint": fingerprint(), "info": info,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.safetensors"
    save_file(stored, str(path), metadata={"golden": json.dumps(meta, sort_keys=True)})
    return path


def _summary(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        parts = []
        for mode in MODES:
            ins = [k for k in keys if k.startswith((f"results/{mode}/inputs/",
                                                    f"results/{mode}/positive/"))
                   or k == f"results/{mode}/matrix"]
            neg = [k for k in keys if k.startswith(f"results/{mode}/negative/")]
            total = sum(float(f.get_tensor(k).double().sum()) for k in ins) \
                - sum(float(f.get_tensor(k).double().sum()) for k in neg)
            parts.append(f"{mode} Σinputs={total:.6g}")
    n_w = sum(1 for k in keys if k.startswith("weights/"))
    return f"{len(keys)} tensors ({n_w} weights), " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", metavar="CASE",
                   help="a case name or glob (repeatable); default: every case")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--out", type=Path, default=GOLDEN, help="output folder (tests/golden)")
    p.add_argument("--threads", type=int, default=THREADS,
                   help="torch threads (default: as the tests, min(2, available))")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    torch.set_num_threads(args.threads)
    names = list(CASES)
    if args.only:
        names = [n for n in CASES if any(fnmatch.fnmatchcase(n, pat) for pat in args.only)]
        if not names:
            print(f"no case matches {args.only}; --list shows them", file=sys.stderr)
            return 2
    print(f"fingerprint: {json.dumps(fingerprint())}")
    total = 0
    for name in names:
        t0 = time.perf_counter()
        path = write(name, args.out)
        size = path.stat().st_size
        total += size
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
              f"({size / 1024:.1f} KiB, {time.perf_counter() - t0:.2f} s): {_summary(path)}")
    stale = sorted(q.stem for q in args.out.glob("*.safetensors") if q.stem not in CASES)
    if stale:
        print(f"warning: files of no case (delete them): {stale}", file=sys.stderr)
    all_size = sum(q.stat().st_size for q in args.out.glob("*"))
    print(f"{len(names)} case(s), {total / 2**20:.2f} MiB written; folder: "
          f"{all_size / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
