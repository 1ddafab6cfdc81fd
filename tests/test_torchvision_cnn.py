"""torchvision CNN families end to end (composite rules in dlbhooks/models/torchvision_cnn.py).

Random weights (BatchNorm parameters and statistics randomised too, so β shares and the
residual splits are not trivial), float64, 1×3×32×32 inputs. Hand references re-run the
pieces of single blocks outside the tracer and split by the §3 rules directly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from helpers import assert_conserved
from torch import nn

import dlbhooks as dlb
from dlbhooks.models.torchvision_cnn import ResidualAdd

MODES = ("default", "contrastive")

# family -> composite record types that must appear in its ledger (so the test exercises them)
FAMILIES = {
    "resnet18": {"BasicBlock"},
    "resnet50": {"Bottleneck"},
    "vgg11": set(),
    "vgg11_bn": set(),
    "densenet121": {"DenseNet", "_DenseBlock", "_DenseLayer"},
    "mobilenet_v2": {"MobileNetV2", "InvertedResidual"},
    "mobilenet_v3_small": {"InvertedResidual", "SqueezeExcitation"},
    "mobilenet_v3_large": {"InvertedResidual", "SqueezeExcitation"},
    "efficientnet_b0": {"MBConv", "SqueezeExcitation", "StochasticDepth"},
    "efficientnet_v2_s": {"FusedMBConv", "MBConv", "StochasticDepth"},
}




@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one thread is as fast and immune to CPU oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(tvm, name)(weights=None, num_classes=10)
    return randomise_bn(model).double().eval()


def image(seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(1, 3, size, size, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """(name, model, input): one model per family, built once."""
    return request.param, build(request.param), image()


@pytest.fixture(scope="module")
def explained(family):
    """{mode: explanation} of the family's model, computed once."""
    _, model, x = family
    return {mode: dlb.explain(model, x, mode=mode) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_family_conserves(family, explained, mode):
    name = family[0]
    exp = explained[mode]
    assert_conserved(exp)
    seen = {e.type for e in exp.ledger}
    assert FAMILIES[name] <= seen, f"{name}: composites not exercised: {FAMILIES[name] - seen}"


@pytest.mark.parametrize("mode", MODES)
def test_family_input_relevance(family, explained, mode):
    name, _, x = family
    exp = explained[mode]
    R = exp.inputs["x"]
    assert R.shape == x.shape and R.dtype == x.dtype
    assert bool(torch.isfinite(R).all())
    assert float(R.abs().sum()) > 0
    # (measured <= 1e-13 of 100)
    tol = 100 * 1e-12
    if mode == "default":  # relevance 100 = input + absorbed (biases, β shares)
        assert abs(exp.total_input + exp.ledger[0].absorbed_inside - 100.0) < tol
    else:
        assert bool((exp.positive["x"] >= 0).all()) and bool((exp.negative["x"] >= 0).all())
        root = exp.ledger[0]
        for k, stream in enumerate((exp.positive, exp.negative)):
            seeded = root.relevance_out[k]
            assert abs(float(stream["x"].sum()) + root.absorbed_inside[k] - seeded) < tol
        assert root.relevance_out[0] == 100.0


def test_family_output_bit_identical(family):
    _, model, x = family
    with torch.no_grad():
        plain = model(x)
    with dlb.trace(model) as tape:
        traced = model(x)
    assert torch.equal(plain, traced)
    assert torch.equal(plain, tape.last_root().outputs[0])


# -- hand references on single blocks ------------------------------------------------------


def bn_share(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """|γ x̂| / (|γ x̂| + |β|): the share of a BatchNorm's output relevance its input keeps."""
    xhat = (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        bn.running_var.view(1, -1, 1, 1) + bn.eps)
    s = (bn.weight.view(1, -1, 1, 1) * xhat).abs()
    return s / (s + bn.bias.abs().view(1, -1, 1, 1))


def add_split(R, a, b):
    """Slow reference of the add rule: R_a = R |a| / (|a| + |b|), element by element."""
    Ra, Rb = torch.zeros_like(R), torch.zeros_like(R)
    for i in range(R.numel()):
        den = abs(a.view(-1)[i]) + abs(b.view(-1)[i])
        if den > 0:
            Ra.view(-1)[i] = R.view(-1)[i] * abs(a.view(-1)[i]) / den
            Rb.view(-1)[i] = R.view(-1)[i] * abs(b.view(-1)[i]) / den
    return Ra, Rb


def seed_like(t: torch.Tensor, seed: int = 3) -> torch.Tensor:
    return torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def resnet18():
    return build("resnet18")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["layer1.0", "layer2.0"])  # identity / downsample shortcut
def test_basic_block_matches_hand_split(resnet18, mode, where):
    block = resnet18.get_submodule(where)
    x = torch.relu(torch.randn(1, block.conv1.in_channels, 6, 6, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(5)))
    with torch.no_grad():  # the pieces, run by hand (no in-place ops)
        a = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        b = x if block.downsample is None else block.downsample(x)
        y = F.relu(a + b)
    R = seed_like(y)  # signed seed: contrastive mode gets pos = R⁺, neg = R⁻
    exp = dlb.explain(block, x, target=R, mode=mode)
    assert_conserved(exp)
    Ra, Rb = add_split(R, a, b)  # the post-add ReLU passes R through
    # the body term reaches bn2's input through the BatchNorm rule
    with torch.no_grad():
        bn2_in = block.conv2(F.relu(block.bn1(block.conv1(x))))
    torch.testing.assert_close(exp.at("bn2"), Ra * bn_share(block.bn2, bn2_in),
                               rtol=1e-12, atol=1e-12)
    if block.downsample is None:
        # x's own share arrives directly: total input relevance minus what came via conv1
        torch.testing.assert_close(exp.inputs["x"] - exp.at("conv1"), Rb, rtol=1e-12, atol=1e-12)
    else:
        ds_bn, ds_conv = block.downsample[1], block.downsample[0]
        with torch.no_grad():
            ds_in = ds_conv(x)
        torch.testing.assert_close(exp.at("downsample.1"), Rb * bn_share(ds_bn, ds_in),
                                   rtol=1e-12, atol=1e-12)
    # the pre-add value came from the snapshot: the tape's bn2 output was modified in place
    with dlb.trace(block) as tape:
        block(x)
    bn2 = tape.last_root().child("bn2")
    assert not torch.equal(bn2.outputs[0], a) and torch.equal(bn2.output_value(0), a)


@pytest.mark.parametrize("mode", MODES)
def test_mobilenet_v2_residual_matches_hand_split(mode):
    model = build("mobilenet_v2")
    block = next(m for m in model.modules()
                 if type(m).__name__ == "InvertedResidual" and m.use_res_connect)
    x = torch.randn(1, block.conv[0][0].in_channels, 5, 5, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        c = block.conv(x)
    R = seed_like(c)
    exp = dlb.explain(block, x, target=R, mode=mode)
    assert_conserved(exp)
    Rc, Rx = add_split(R, c, x)
    torch.testing.assert_close(exp.inputs["x"] - exp.at("conv"), Rx, rtol=1e-12, atol=1e-12)
    last_bn = block.conv[-1]
    with torch.no_grad():
        bn_in = block.conv[:-1](x)
    torch.testing.assert_close(exp.at(f"conv.{len(block.conv) - 1}"), Rc * bn_share(last_bn, bn_in),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_squeeze_excitation_halves(mode):
    from torchvision.ops import SqueezeExcitation

    torch.manual_seed(2)
    se = SqueezeExcitation(8, 4).double().eval()
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y = se(x)
    R = seed_like(y)
    exp = dlb.explain(se, x, target=R, mode=mode)
    assert_conserved(exp)
    # half of R to the gate (summed over the positions it scales), half straight to x
    torch.testing.assert_close(exp.at("scale_activation"), (R / 2).sum((2, 3), keepdim=True),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(exp.inputs["input"] - exp.at("avgpool"), R / 2,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_dense_block_cat_split(mode):
    from torchvision.models.densenet import _DenseBlock

    torch.manual_seed(4)
    block = randomise_bn(_DenseBlock(3, 6, 2, 4, 0.0)).double().eval()
    x = torch.randn(1, 6, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
    R = seed_like(y)
    exp = dlb.explain(block, x, target=R, mode=mode)
    assert_conserved(exp)
    # the last layer's output is only in the final cat: it gets exactly its slice of R
    last = next(e for e in exp.ledger if e.key == "denselayer3")
    out = last.relevance_out
    want = R[:, -4:].sum()
    got = out if mode == "default" else out[0] - out[1]
    assert abs(got - float(want)) < 1e-12 * abs(float(want))  # (measured 3.6e-15 of 22)
    # each layer splits its norm1 input relevance back over the list it concatenated
    for k in (1, 2, 3):
        per_input = exp.tensors[f"denselayer{k}"]
        assert len(per_input) == k
        torch.testing.assert_close(torch.cat(per_input, 1), exp.at(f"denselayer{k}.norm1"),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_densenet_head_pools_by_add_rule(mode):
    torch.manual_seed(0)
    model = randomise_bn(tvm.DenseNet(growth_rate=4, block_config=(1, 1), num_init_features=8,
                                      bn_size=2, num_classes=3)).double().eval()
    x = image(size=16)
    exp = dlb.explain(model, x, mode=mode)
    assert_conserved(exp)
    with torch.no_grad():
        feats = model.features(x)
    relu = feats.clamp_min(0)
    R_flat = exp.at("classifier")  # relevance on the flattened pooled features
    R_x = torch.zeros_like(relu)
    for c in range(relu.shape[1]):  # slow reference: the add rule over each channel's window
        den = relu[0, c].abs().sum()
        if den > 0:
            R_x[0, c] = R_flat[0, c] * relu[0, c].abs() / den
    with torch.no_grad():
        norm5_in = model.features[:-1](x)
    torch.testing.assert_close(exp.at("features.norm5"),
                               R_x * bn_share(model.features.norm5, norm5_in),
                               rtol=1e-12, atol=1e-12)


def test_composite_names_missing_child_clearly():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3).double()

        def forward(self, x):
            return self.lin(x) + x

    dlb.register_rule(Odd, ResidualAdd("body"))
    try:
        with pytest.raises(dlb.UnsupportedModuleError, match="child 'body'"):
            dlb.explain(Odd(), torch.randn(2, 3, dtype=torch.float64))
    finally:
        dlb.unregister_rule(Odd)


def test_residual_condition_false_walks_children():
    model = build("mobilenet_v2")
    block = next(m for m in model.modules()
                 if type(m).__name__ == "InvertedResidual" and not m.use_res_connect)
    x = torch.randn(1, block.conv[0][0].in_channels, 6, 6, dtype=torch.float64)
    exp = dlb.explain(block, x, target=seed_like(block(x).detach()))
    assert_conserved(exp)
    # no add: everything reaching x came through the body
    torch.testing.assert_close(exp.inputs["x"], exp.at("conv"), rtol=0, atol=0)
