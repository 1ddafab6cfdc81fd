"""Torch functions recorded on the tape (METHOD §7), each rule against a slow reference
written here separately, and what recording must not change."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dlbhooks as dlb

D = torch.float64
MODES = ("default", "contrastive")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _explain(model: nn.Module, *inputs: torch.Tensor, mode: str = "default"):
    with dlb.trace(model) as tape:
        out = model(*inputs)
    return tape, tape.explain(mode=mode), out


def _conserved(exp) -> None:
    assert exp.conservation_error() < 1e-12 * 100, exp.conservation_error()


class Pair(nn.Module):
    """Two linear branches of the input, combined by ``op``, then a head."""

    def __init__(self, op, width: int, seed: int = 0, d_in: int = 4, d: int = 6):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(d_in, d), nn.Linear(d_in, d)
        self.head = nn.Linear(width, 3)
        self.op = op

    def forward(self, x):
        y = self.op(self.a(x), self.b(x))
        return self.head(y.reshape(y.shape[0], -1))


# -- routing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_cat_moves_relevance_with_the_values_exactly(mode):
    model = Pair(lambda a, b: torch.cat([b, a], -1), 12).double()
    x = torch.randn(5, 4, dtype=D, generator=_gen(0))
    tape, exp, _ = _explain(model, x, mode=mode)
    _conserved(exp)
    R = exp.at("head")  # relevance on the cat's output
    assert torch.equal(exp.at("cat", 0), R[:, :6]) and torch.equal(exp.at("cat", 1), R[:, 6:])
    assert exp.absorbed.get("cat", 0.0) == 0.0


def test_chunks_and_stack_route_back_to_their_source():
    class Swap(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            a, b = self.lin(x).chunk(2, -1)  # views: the engine maps them back
            return self.head(torch.stack([b, a], 1).flatten(1))

    model = Swap().double()
    x = torch.randn(3, 4, dtype=D, generator=_gen(1))
    tape, exp, _ = _explain(model, x)
    _conserved(exp)
    R = exp.at("head").view(3, 2, 3)
    assert torch.equal(exp.at("stack", 0), R[:, 0]) and torch.equal(exp.at("stack", 1), R[:, 1])


# -- reductions and linear maps ------------------------------------------------------------


def _slow_linear_map(R: torch.Tensor, a: torch.Tensor, fmap) -> torch.Tensor:
    """§2 on a bias-free linear map, from its dense matrix (built column by column)."""
    n = a.numel()
    cols = [fmap(torch.eye(n, dtype=D)[i].view(a.shape)).reshape(-1) for i in range(n)]
    W = torch.stack(cols, 1)  # [out, in]
    contrib = (W * a.reshape(1, -1)).abs()  # |w_ji a_i|
    den = contrib.sum(1, keepdim=True)
    share = torch.where(den > 0, contrib / den, torch.zeros_like(contrib))
    return (share * R.reshape(-1, 1)).sum(0).view(a.shape)


def test_functional_mean_is_the_add_rule_over_the_reduced_values():
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(2)
            self.lin, self.head = nn.Linear(4, 5), nn.Linear(5, 2)

        def forward(self, x):  # [B, T, 4] -> mean over T
            return self.head(self.lin(x).mean(1))

    model = Pool().double()
    x = torch.randn(2, 3, 4, dtype=D, generator=_gen(2))
    tape, exp, _ = _explain(model, x)
    _conserved(exp)
    a = tape.last_root().child("lin").outputs[0]
    R = exp.at("head")
    want = torch.empty_like(a)
    for b, t, h in itertools.product(range(2), range(3), range(5)):  # |a| share over T
        want[b, t, h] = R[b, h] * a[b, t, h].abs() / a[b, :, h].abs().sum()
    assert torch.allclose(exp.at("mean"), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_interpolate_is_the_weighted_sum_of_its_implicit_weights(mode):
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.conv, self.head = nn.Conv2d(1, 2, 1), nn.Linear(2 * 6 * 6, 3)

        def forward(self, x):
            y = F.interpolate(self.conv(x), scale_factor=2, mode=mode)
            return self.head(y.flatten(1))

    model = Up().double()
    x = torch.randn(1, 1, 3, 3, dtype=D, generator=_gen(3))
    for m in MODES:
        tape, exp, _ = _explain(model, x, mode=m)
        _conserved(exp)
    tape, exp, _ = _explain(model, x)
    a = tape.last_root().child("conv").outputs[0]
    R = exp.at("head").view(1, 2, 6, 6)
    want = _slow_linear_map(R, a, lambda t: F.interpolate(t, scale_factor=2, mode=mode))
    assert torch.allclose(exp.at("interpolate"), want, rtol=0, atol=1e-12)


# -- products -----------------------------------------------------------------------------------


def test_matmul_of_two_activations_splits_each_pair_half_and_half():
    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.q, self.k, self.head = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(25, 2)

        def forward(self, x):  # [B, T=5, 4]
            s = self.q(x) @ self.k(x).transpose(-1, -2)
            return self.head(s.flatten(1))

    model = Scores().double()
    x = torch.randn(2, 5, 4, dtype=D, generator=_gen(4))
    tape, exp, _ = _explain(model, x)
    _conserved(exp)
    root = tape.last_root()
    q, k = root.child("q").outputs[0], root.child("k").outputs[0]
    R = exp.at("head").view(2, 5, 5)
    want_q, want_k = torch.zeros_like(q), torch.zeros_like(k)
    for b, i, j in itertools.product(range(2), range(5), range(5)):
        pairs = (q[b, i] * k[b, j]).abs()  # over the summed index
        share = R[b, i, j] * pairs / pairs.sum()
        want_q[b, i] += share / 2
        want_k[b, j] += share / 2
    assert torch.allclose(exp.at("matmul", 0), want_q, rtol=0, atol=1e-12)
    # input 1 is the transposed view of k's output: [B, d, T]
    assert torch.allclose(exp.at("matmul", 1), want_k.transpose(-1, -2), rtol=0, atol=1e-12)
    for m in MODES:
        _conserved(_explain(model, x, mode=m)[1])


def test_mul_by_a_constant_or_parameter_passes_and_two_activations_halve():
    x = torch.randn(4, 4, dtype=D, generator=_gen(5))
    for op in (lambda a, b: a * 3.0, lambda a, b: 2.5 * a):
        tape, exp, _ = _explain(Pair(op, 6).double(), x)
        assert torch.equal(exp.at("mul"), exp.at("head"))
    tape, exp, _ = _explain(Pair(lambda a, b: a * b, 6).double(), x)
    _conserved(exp)
    assert torch.equal(exp.at("mul", 0), exp.at("head") / 2)
    assert torch.equal(exp.at("mul", 1), exp.at("head") / 2)


def test_a_statistic_of_the_same_input_takes_nothing():
    class RMS(nn.Module):  # an RMSNorm without a registered rule, written functionally
        def __init__(self):
            super().__init__()
            torch.manual_seed(6)
            self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            h = self.lin(x)
            return self.head(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))

    model = RMS().double()
    x = torch.randn(3, 4, dtype=D, generator=_gen(6))
    for mode in MODES:
        tape, exp, _ = _explain(model, x, mode=mode)
        _conserved(exp)
    tape, exp, _ = _explain(model, x)
    assert torch.equal(exp.at("mul", 0), exp.at("head"))
    with pytest.raises(KeyError):
        exp.at("mul", 1)  # the statistic gets none


def test_a_parameter_term_keeps_its_add_rule_share():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(7)
            self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 2)
            self.pos = nn.Parameter(torch.randn(6))

        def forward(self, x):
            return self.head(self.lin(x) + self.pos)

    model = Shifted().double()
    x = torch.randn(3, 4, dtype=D, generator=_gen(7))
    tape, exp, _ = _explain(model, x)
    _conserved(exp)
    h = tape.last_root().child("lin").outputs[0]
    R = exp.at("head")
    p = model.pos.detach()
    kept = (R * p.abs() / (h.abs() + p.abs())).sum()
    assert exp.absorbed["add"] == pytest.approx(float(kept), rel=1e-12)
    assert torch.allclose(exp.at("add"), R * h.abs() / (h.abs() + p.abs()), rtol=0, atol=1e-12)


def test_in_place_add_splits_by_the_value_it_overwrote():
    class Residual(nn.Module):
        def __init__(self, inplace: bool):
            super().__init__()
            torch.manual_seed(8)
            self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)
            self.inplace = inplace

        def forward(self, x):
            h = self.a(x)
            if self.inplace:
                h += self.b(x)
            else:
                h = h + self.b(x)
            return self.head(h)

    x = torch.randn(3, 4, dtype=D, generator=_gen(8))
    for mode in MODES:
        plain = _explain(Residual(False).double(), x, mode=mode)[1]
        inplace = _explain(Residual(True).double(), x, mode=mode)[1]
        _conserved(inplace)
        assert torch.allclose(inplace.inputs["x"], plain.inputs["x"], rtol=0, atol=1e-13)


# -- scope, fidelity, errors ------------------------------------------------------------------


def test_recording_leaves_outputs_and_modules_with_rules_untouched():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(9)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            y, _ = self.attn(x, x, x)
            return self.lin(F.gelu(y) + x).sum(1)

    model = Net().double().eval()
    x = torch.randn(2, 5, 8, dtype=D, generator=_gen(9))
    with torch.no_grad():
        want = model(x)
    tape, exp, out = _explain(model, x)
    assert torch.equal(out, want)  # the attention's fast path runs as untraced
    assert tape.last_root().child("attn").children == []  # no function records inside
    kinds = [r.type_name for r in tape.last_root().children]
    assert kinds == ["MultiheadAttention", "gelu", "add", "Linear", "sum"]
    assert torch._C._len_torch_function_stack() == 0
    for mode in MODES:
        _conserved(_explain(model, x, mode=mode)[1])


def test_nested_traces_leave_no_mode_behind():
    model = Pair(lambda a, b: a + b, 6).double()
    x = torch.randn(2, 4, dtype=D)
    with dlb.trace(model) as outer:
        with dlb.trace(model) as inner:
            model(x)
    assert torch._C._len_torch_function_stack() == 0
    assert torch.equal(outer.explain().inputs["x"], inner.explain().inputs["x"])


def test_register_function_rule_adds_a_rule():
    model = Pair(lambda a, b: torch.cumsum(a, -1), 6).double()
    x = torch.randn(2, 4, dtype=D)
    with pytest.raises(dlb.FunctionalGapError, match=r"cumsum .*test_functions.py:\d+"):
        _explain(model, x)

    def cumsum_rule(record, relevance_out, ctx) -> dlb.RuleResult:  # all to the input
        R = relevance_out[0]
        return dlb.RuleResult([R] + [None] * (len(record.inputs) - 1))

    dlb.register_function_rule(torch.cumsum, rule=cumsum_rule)
    try:
        _conserved(_explain(model, x)[1])
    finally:
        from dlbhooks.rules.functions import _FUNCTION_RULES
        _FUNCTION_RULES.pop(torch.cumsum)


def test_a_small_unet_explains_without_registration():
    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(10)
            self.down = nn.Conv2d(1, 4, 3, padding=1)
            self.mid = nn.Conv2d(4, 4, 3, padding=1)
            self.up = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            d = F.relu(self.down(x))
            m = F.relu(self.mid(F.avg_pool2d(d, 2)))
            u = F.interpolate(m, scale_factor=2, mode="bilinear", align_corners=False)
            return self.up(torch.cat([u, d], 1)).mean((2, 3))

    model = UNet().double().eval()
    x = torch.randn(2, 1, 8, 8, dtype=D, generator=_gen(10))
    with torch.no_grad():
        want = model(x)
    for mode in MODES:
        tape, exp, out = _explain(model, x, mode=mode)
        assert torch.equal(out, want)
        _conserved(exp)
        assert exp.inputs["x"].shape == x.shape and float(exp.inputs["x"].abs().sum()) > 0


def test_constants_a_function_puts_in_keep_their_relevance():
    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(11)
            self.lin, self.head = nn.Linear(4, 6), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(F.pad(self.lin(x), (1, 1), value=0.5))

    model = Padded().double()
    x = torch.randn(3, 4, dtype=D, generator=_gen(11))
    for mode in MODES:
        tape, exp, _ = _explain(model, x, mode=mode)
        _conserved(exp)
    tape, exp, _ = _explain(model, x)
    R = exp.at("head")
    assert exp.absorbed["pad"] == pytest.approx(float(R[:, 0].sum() + R[:, -1].sum()),
                                                rel=1e-12)
    assert torch.equal(exp.at("pad"), R[:, 1:-1])


def test_functional_forms_match_their_module_rules():
    """F.layer_norm, F.conv2d, F.embedding and F.scaled_dot_product_attention called in a
    forward give what the module forms' rules give."""

    class Modules(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(12)
            self.emb, self.conv = nn.Embedding(11, 8), nn.Conv1d(8, 8, 3, padding=1)
            self.norm, self.q = nn.LayerNorm(8), nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def attend(self, h):
            q = self.q(h).view(2, 5, 2, 4).transpose(1, 2)
            k = h.view(2, 5, 2, 4).transpose(1, 2)
            return q, k

        def forward(self, ids):
            h = self.emb(ids)
            h = self.conv(h.transpose(1, 2)).transpose(1, 2)
            h = self.norm(h)
            q, k = self.attend(h)
            a = F.scaled_dot_product_attention(q, k, k, is_causal=True)
            return self.head(a.transpose(1, 2).reshape(2, 5, 8)).mean(1)

    class Functional(Modules):
        def forward(self, ids):
            h = F.embedding(ids, self.emb.weight)
            h = F.conv1d(h.transpose(1, 2), self.conv.weight, self.conv.bias,
                         padding=1).transpose(1, 2)
            h = F.layer_norm(h, (8,), self.norm.weight, self.norm.bias, self.norm.eps)
            q, k = self.attend(h)
            a = F.scaled_dot_product_attention(q, k, k, is_causal=True)
            return self.head(a.transpose(1, 2).reshape(2, 5, 8)).mean(1)

    ids = torch.randint(0, 11, (2, 5), generator=_gen(12))
    for mode in MODES:
        mod = _explain(Modules().double(), ids, mode=mode)[1]
        fun = _explain(Functional().double(), ids, mode=mode)[1]
        _conserved(fun)
        assert torch.allclose(fun.inputs["ids"], mod.inputs["ids"], rtol=0, atol=1e-12)


def test_a_channel_first_layer_norm_subclass_is_walked_not_given_the_parent_rule():
    class LayerNorm2d(nn.LayerNorm):  # as in torchvision's ConvNeXt
        def forward(self, x):
            x = x.permute(0, 2, 3, 1)
            x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)

    class Net(nn.Module):
        def __init__(self, norm):
            super().__init__()
            torch.manual_seed(13)
            self.conv, self.norm, self.head = nn.Conv2d(2, 4, 3), norm, nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.norm(self.conv(x)).mean((2, 3)))

    class ChannelsLast(Net):  # the same maths with nn.LayerNorm's own rule
        def forward(self, x):
            h = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            return self.head(h.mean((2, 3)))

    x = torch.randn(2, 2, 5, 5, dtype=D, generator=_gen(13))
    ln = nn.LayerNorm(4).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.2, 0.2)
    ln2d = LayerNorm2d(4).double()
    ln2d.load_state_dict(ln.state_dict())
    for mode in MODES:
        tape, got, _ = _explain(Net(ln2d).double(), x, mode=mode)
        _conserved(got)
        assert [r.type_name for r in tape.last_root().child("norm").children] == ["layer_norm"]
        want = _explain(ChannelsLast(ln).double(), x, mode=mode)[1]
        assert torch.allclose(got.inputs["x"], want.inputs["x"], rtol=0, atol=1e-12)


def test_coverage_dry_run_reports_functions_and_gaps_before_explaining():
    class Good(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(14)
            self.a, self.head = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            return self.head(torch.cat([F.relu(self.a(x))[:, :3], self.a(x)[:, 3:] * 2], -1))

    class Bad(Good):
        def forward(self, x):
            return self.head(torch.cumsum(self.a(x), -1))  # no rule for cumsum

    x = torch.randn(2, 4, dtype=D, generator=_gen(14))
    static = dlb.coverage(Good())
    assert static.calls is None and static.complete  # the module tree alone: all covered
    good = dlb.coverage(Good().double(), x)
    assert good.complete and good.conservation < 1e-12 * 100
    assert good.calls["relu"] == "passthrough_call" and good.calls["cat"] == "routing_call"
    assert "test_functions.py:" in good.where["cat"]
    bad = dlb.coverage(Bad().double(), x)
    assert not bad.complete and bad.missing == ["cumsum"]
    assert bad.error.startswith("FunctionalGapError") and "cumsum" in bad.error
    assert "MISSING" in str(bad) and "dry run: FunctionalGapError" in str(bad)
    # the old second argument: rules
    relu_rule = dlb.stacked_rule(lambda r, R, c: dlb.RuleResult([R[0]]))
    assert dlb.coverage(Good(), {nn.ReLU: relu_rule}).complete


def test_functional_max_pool_matches_the_module_pool():
    class Modules(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(15)
            self.conv, self.head = nn.Conv2d(1, 3, 3), nn.Linear(3 * 3 * 3, 2)
            self.pool, self.apool = nn.MaxPool2d(2, ceil_mode=True), nn.AdaptiveMaxPool2d(3)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.head((self.pool(h) + self.apool(h)).flatten(1))

    class Functional(Modules):
        def forward(self, x):
            h = torch.relu(self.conv(x))
            p = F.max_pool2d(h, 2, ceil_mode=True) + F.adaptive_max_pool2d(h, 3)
            return self.head(p.flatten(1))

    x = torch.randn(2, 1, 7, 7, dtype=D, generator=_gen(15))
    for mode in MODES:
        mod = _explain(Modules().double(), x, mode=mode)[1]
        fun = _explain(Functional().double(), x, mode=mode)[1]
        _conserved(fun)
        assert torch.allclose(fun.inputs["x"], mod.inputs["x"], rtol=0, atol=1e-12)


def test_a_module_that_reads_only_constants_makes_constants():
    """A position table looked up with positions (not derived from the forward's inputs)
    is a source of no relevance: its add-rule share is absorbed where it is added."""

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(16)
            self.tok, self.pos, self.head = nn.Embedding(9, 6), nn.Embedding(5, 6), nn.Linear(6, 2)

        def forward(self, ids):
            p = self.pos(torch.arange(ids.shape[1]))
            return self.head(self.tok(ids) + p).mean(1)

    ids = torch.randint(0, 9, (2, 5), generator=_gen(16))
    model = Positions().double()
    for mode in MODES:
        tape, exp, _ = _explain(model, ids, mode=mode)
        _conserved(exp)
        assert "pos" not in exp.layers  # no relevance reached the table
    tape, exp, _ = _explain(model, ids)
    t, p = model.tok(ids).detach(), model.pos.weight.detach()[None]
    R = exp.at("head")
    assert exp.absorbed["add"] == pytest.approx(
        float((R * p.abs() / (t.abs() + p.abs())).sum()), rel=1e-12)


def test_quantized_weights_are_read_through_a_dequantizer_or_named_clearly():
    class QLinear(nn.Linear):  # int8 weights with a per-row scale
        def __init__(self, lin: nn.Linear):
            super().__init__(lin.in_features, lin.out_features, dtype=D)
            scale = lin.weight.detach().abs().amax(1, keepdim=True) / 127
            q = torch.round(lin.weight.detach() / scale).to(torch.int8)
            self.weight = nn.Parameter(q, requires_grad=False)
            self.register_buffer("scale", scale)
            self.bias = lin.bias

        def forward(self, x):
            return F.linear(x, self.weight.to(x.dtype) * self.scale, self.bias)

    torch.manual_seed(17)
    float_model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).double()
    q_model = nn.Sequential(QLinear(float_model[0]), nn.ReLU(), float_model[2])
    with torch.no_grad():  # the float model with the dequantized weights: the reference
        float_model[0].weight.copy_(q_model[0].weight.double() * q_model[0].scale)
    x = torch.randn(3, 4, dtype=D, generator=_gen(17))
    with pytest.raises(dlb.UnsupportedModuleError, match=r"QLinear.weight holds quantized"):
        dlb.explain(q_model, x)
    dlb.register_dequantizer(QLinear, lambda m, W: W.to(m.scale.dtype) * m.scale)
    try:
        for mode in MODES:
            got = dlb.explain(q_model, x, mode=mode)
            want = dlb.explain(float_model, x, mode=mode)
            assert torch.allclose(got.inputs["input"], want.inputs["input"], rtol=0,
                                  atol=1e-12)
    finally:
        from dlbhooks.weights import DEQUANTIZERS
        DEQUANTIZERS.pop(QLinear)


def test_einsum_of_two_activations_is_the_matmul_rule():
    class Scores(nn.Module):
        def __init__(self, einsum: bool):
            super().__init__()
            torch.manual_seed(18)
            self.q, self.k, self.head = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(25, 2)
            self.einsum = einsum

        def forward(self, x):
            q, k = self.q(x), self.k(x)
            s = torch.einsum("bid,bjd->bij", q, k) if self.einsum else q @ k.transpose(-1, -2)
            return self.head(s.flatten(1))

    x = torch.randn(2, 5, 4, dtype=D, generator=_gen(18))
    for mode in MODES:
        got = _explain(Scores(True).double(), x, mode=mode)[1]
        want = _explain(Scores(False).double(), x, mode=mode)[1]
        _conserved(got)
        assert torch.allclose(got.inputs["x"], want.inputs["x"], rtol=0, atol=1e-12)


def test_index_add_is_the_add_rule_over_each_position_s_terms():
    class Scatter(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(19)
            self.a, self.b, self.head = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):  # x [5, 4]: rows of b(x) added into 3 rows of a(x[:3])
            base = self.a(x[:3])
            return self.head(base.index_add(0, torch.tensor([0, 2, 2, 1, 0]), self.b(x)))

    model = Scatter().double()
    x = torch.randn(5, 4, dtype=D, generator=_gen(19))
    for mode in MODES:
        _conserved(_explain(model, x, mode=mode)[1])
    tape, exp, _ = _explain(model, x)
    root = tape.last_root()
    base, src = root.child("a").outputs[0], root.child("b").outputs[0]
    R = exp.at("head")
    idx = [0, 2, 2, 1, 0]
    want_base, want_src = torch.zeros_like(base), torch.zeros_like(src)
    for t, c in itertools.product(range(3), range(3)):
        rows = [k for k in range(5) if idx[k] == t]
        den = base[t, c].abs() + sum(src[k, c].abs() for k in rows)
        want_base[t, c] = R[t, c] * base[t, c].abs() / den
        for k in rows:
            want_src[k, c] = R[t, c] * src[k, c].abs() / den
    assert torch.allclose(exp.at("index_add", 0), want_base, rtol=0, atol=1e-12)
    # (input 1 is the index tensor)
    assert torch.allclose(exp.at("index_add", 2), want_src, rtol=0, atol=1e-12)


def test_baddbmm_splits_between_the_bias_and_the_product():
    class Alibi(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(20)
            self.q, self.k, self.head = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(25, 2)
            self.bias = nn.Parameter(torch.randn(1, 1, 5))

        def forward(self, x):  # [B, 5, 4]
            s = torch.baddbmm(self.bias, self.q(x), self.k(x).transpose(1, 2), beta=1.0,
                              alpha=0.5)
            return self.head(s.flatten(1))

    model = Alibi().double()
    x = torch.randn(2, 5, 4, dtype=D, generator=_gen(20))
    for mode in MODES:
        _conserved(_explain(model, x, mode=mode)[1])
    tape, exp, _ = _explain(model, x)
    root = tape.last_root()
    q, k = root.child("q").outputs[0], root.child("k").outputs[0]
    bias = model.bias.detach()
    R = exp.at("head").view(2, 5, 5)
    want_q, kept = torch.zeros_like(q), 0.0
    for b, i, j in itertools.product(range(2), range(5), range(5)):
        pairs = 0.5 * (q[b, i] * k[b, j]).abs()  # |alpha q_ie k_je|, alpha = 0.5
        den = pairs.sum() + bias[0, 0, j].abs()  # the bias of step 3 (METHOD §4)
        kept += float(R[b, i, j] * bias[0, 0, j].abs() / den)
        want_q[b, i] += R[b, i, j] * pairs / den / 2
    # (input 0 is the bias, a parameter: a constant)
    assert torch.allclose(exp.at("baddbmm", 1), want_q, rtol=0, atol=1e-12)
    assert exp.absorbed["baddbmm"] == pytest.approx(kept, rel=1e-12)


def test_temperature_changes_the_probabilities_the_seed_uses_only():
    """METHOD §1: logits / T before the contrastive R- split; default mode, a fixed
    target and the argmax do not depend on T."""
    from dlbhooks.seeds import make_seed

    out = torch.randn(3, 5, dtype=D, generator=_gen(22))
    cold, hot = (make_seed(out, mode="contrastive", temperature=t) for t in (0.5, 4.0))
    assert torch.equal(cold[0], hot[0])  # R+ at the argmax: the same
    p = torch.softmax(out / 4.0, -1)
    p[torch.arange(3), out.argmax(-1)] = 0
    assert torch.allclose(hot[1], 100 * p / p.sum(-1, keepdim=True), rtol=0, atol=1e-12)
    assert not torch.allclose(cold[1], hot[1])
    assert torch.equal(make_seed(out, temperature=0.5), make_seed(out))
    with pytest.raises(dlb.TargetError, match="temperature"):
        make_seed(out, temperature=0.0)
    model = Pair(lambda a, b: a + b, 6).double()
    x = torch.randn(2, 4, dtype=D)
    a = dlb.explain(model, x, temperature=3.0)
    assert torch.equal(a.inputs["x"], dlb.explain(model, x).inputs["x"])
    assert a.info["temperature"] == 3.0


def test_functions_are_recorded_under_a_storage_policy_too():
    """Records hold copies under a storage policy; the forward goes on with the originals,
    so whether a function's argument is derived is looked up through its copy."""
    model = Pair(lambda a, b: torch.cat([F.relu(a), b * 2.0], -1) + 1.0, 12).double()
    x = torch.randn(3, 4, dtype=D, generator=_gen(23))
    for mode in MODES:
        want = dlb.explain(model, x, mode=mode).inputs["x"]
        got = dlb.explain(model, x, mode=mode, storage="cpu")
        assert torch.equal(got.inputs["x"], want)  # lossless copies: the same, bit for bit
        cast = dlb.explain(model, x, mode=mode, storage="fp32")
        assert torch.allclose(cast.inputs["x"], want, rtol=0, atol=1e-4)
        _conserved(cast)


def test_amax_where_and_functional_linear():
    """``amax`` over a dim gives each window's relevance to its winner (ties split, checked
    against a loop), ``where`` routes exactly, ``F.linear`` equals ``nn.Linear``."""

    class Net(nn.Module):
        def __init__(self, functional: bool):
            super().__init__()
            torch.manual_seed(24)
            self.a, self.head = nn.Linear(4, 6), nn.Linear(3, 2)
            self.functional = functional

        def forward(self, x):
            h = self.a(x)
            h = torch.where(h > 0, h, 0.1 * h)
            m = h.view(-1, 3, 2).amax(-1)
            if self.functional:
                return F.linear(m, self.head.weight, self.head.bias)
            return self.head(m)

    x = torch.randn(5, 4, dtype=D, generator=_gen(24))
    x[0] = 0.0  # a row where both window members are 0 after the first layer's bias: a tie
    for mode in MODES:
        mod = _explain(Net(False).double(), x, mode=mode)[1]
        fun = _explain(Net(True).double(), x, mode=mode)[1]
        _conserved(fun)
        assert torch.allclose(fun.inputs["x"], mod.inputs["x"], rtol=0, atol=1e-12)
    tape, exp, _ = _explain(Net(True).double(), x)
    h = tape.last_root().child("where").outputs[0].view(-1, 3, 2)
    R = exp.at("linear")  # relevance on amax's output [5, 3]
    want = torch.zeros_like(h)
    for b, w in itertools.product(range(5), range(3)):
        best = [k for k in range(2) if h[b, w, k] == h[b, w].max()]
        for k in best:
            want[b, w, k] = R[b, w] / len(best)
    assert torch.allclose(exp.at("amax"), want, rtol=0, atol=1e-12)
