"""Every rule against a slow, per-element reference written here from METHOD.md.

The references below loop over units and over the contributions ``w_ji·a_i`` one at a
time (explicit P_j, N_j, |b_j|, T_j, saturation masks and the contrastive aligned /
crossed / degenerate cases), over pooling windows, bag members and broadcast elements.
They share no code with the package. Module rules are exercised through ``dlb.explain``
on tiny models whose output relevance is an explicit seed tensor (used as-is).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import dlbhooks as dlb
from dlbhooks.engine import Engine
from dlbhooks.rules.elementwise import add_rule, product_rule
from dlbhooks.seeds import make_seed

D = torch.float64
# agreement with the references, relative to the relevance scale: measured <= 4.9e-15
RTOL = 1e-12
HYP = settings(max_examples=25, deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# METHOD.md §2: saturated ranges of the pre-activation t_j (lower, upper)
BOUNDS: dict[type, tuple[float | None, float | None]] = {
    nn.Tanh: (-2.0, 2.0),
    nn.Sigmoid: (-4.0, 4.0),
    nn.Softmax: (-1.0, 2.0),
    nn.SiLU: (-6.0, None),
    nn.ReLU: (0.0, None),
}


def make_act(cls: type) -> nn.Module:
    return cls(dim=-1) if cls is nn.Softmax else cls()


# ---------------------------------------------------------------------------------------
# The reference §2 rule, one unit and one contribution at a time
# ---------------------------------------------------------------------------------------
# A unit is a list of contributions (value, targets); targets lists (tensor k, flat index i,
# fraction f): the contribution's share goes f to element i of input tensor k (f = 1 for
# plain weighted sums, 1/2 to each factor for Bilinear's pair contributions).
Contribution = tuple[float, list[tuple[int, int, float]]]


def ref_default(
    units: list[list[Contribution]],
    bias: list[float],
    R: list[float],
    sizes: Sequence[int],
    bounds: tuple[float | None, float | None] | None = None,
) -> tuple[list[list[float]], float, int]:
    """Default mode: R_in_i = Σ_j R_j·|c_ji| / T_j, T_j = P_j + N_j + |b_j|; with saturation
    the side that cannot move Φ gets nothing. Returns (R per input, absorbed, #saturated)."""
    out = [[0.0] * n for n in sizes]
    absorbed, saturated = 0.0, 0
    for j, contribs in enumerate(units):
        r, b = R[j], bias[j]
        P = sum(c for c, _ in contribs if c > 0)
        N = sum(-c for c, _ in contribs if c < 0)
        t = P - N + b
        use_p = use_n = True
        if bounds is not None:
            lo, hi = bounds
            if lo is not None and t < lo:
                use_p = False
            if hi is not None and t > hi:
                use_n = False
            if not (use_p and use_n) and r != 0:
                saturated += 1
        T = (P if use_p else 0.0) + (N if use_n else 0.0) + abs(b)
        if T == 0:
            absorbed += r
            continue
        given_out = 0.0
        for c, targets in contribs:
            if (c > 0 and use_p) or (c < 0 and use_n):
                share = r * abs(c) / T
                given_out += share
                for k, i, f in targets:
                    out[k][i] += f * share
        absorbed += r - given_out
    return out, absorbed, saturated


def ref_contrastive(
    units: list[list[Contribution]],
    bias: list[float],
    Rp: list[float],
    Rn: list[float],
    sizes: Sequence[int],
) -> tuple[list[list[float]], list[list[float]], tuple[float, float], Counter]:
    """Contrastive mode of §2: aligned / crossed / degenerate, no bias sink.

    Returns (+ stream per input, - stream per input, (lost+, lost-), case counts)."""
    pos = [[0.0] * n for n in sizes]
    neg = [[0.0] * n for n in sizes]
    lost_p = lost_n = 0.0
    cases: Counter = Counter()

    def give(stream, targets, amount):
        for k, i, f in targets:
            stream[k][i] += f * amount

    for j, contribs in enumerate(units):
        rp, rn = Rp[j], Rn[j]
        if rp == 0 and rn == 0:
            continue
        P = sum(c for c, _ in contribs if c > 0)
        N = sum(-c for c, _ in contribs if c < 0)
        t = P - N + bias[j]
        if P == 0 or N == 0:
            S = P + N
            if S == 0:
                cases["lost"] += 1
                lost_p += rp
                lost_n += rn
                continue
            cases["degenerate"] += 1
            for c, targets in contribs:
                give(pos, targets, rp * abs(c) / S)
                give(neg, targets, rn * abs(c) / S)
            continue
        aligned = (t > 0 and rp > rn) or (t <= 0 and rp <= rn)
        cases["aligned" if aligned else "crossed"] += 1
        for c, targets in contribs:
            if aligned:
                if c > 0:
                    give(pos, targets, rp * c / P)
                elif c < 0:
                    give(neg, targets, rn * -c / N)
            else:
                if c < 0:
                    give(pos, targets, rp * -c / N)
                elif c > 0:
                    give(neg, targets, rn * c / P)
    return pos, neg, (lost_p, lost_n), cases


# ---------------------------------------------------------------------------------------
# Units of each layer type, written out index by index
# ---------------------------------------------------------------------------------------
def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _bias(m: nn.Module) -> list[float] | None:
    return None if m.bias is None else _np(m.bias).tolist()


def linear_units(x: Tensor, W: Tensor, b: Tensor | None):
    """y[r, j] = Σ_i W[j, i]·x[r, i] + b[j] over the rows r of x [..., in]."""
    xs = _np(x).reshape(-1, x.shape[-1])
    Wn = _np(W)
    bn = None if b is None else _np(b)
    units, bias = [], []
    n_in = xs.shape[1]
    for r in range(xs.shape[0]):
        for j in range(Wn.shape[0]):
            units.append([(float(Wn[j, i] * xs[r, i]), [(0, r * n_in + i, 1.0)])
                          for i in range(n_in)])
            bias.append(0.0 if bn is None else float(bn[j]))
    return units, bias


def conv_units(x: Tensor, m: nn.Module, out_shape):
    """y[n, co, o] = Σ_{ci in co's group, k} W[co, ci', k]·x[n, ci, o·s - p + k·d] + b[co]."""
    xn, Wn = _np(x), _np(m.weight)
    B, Cin, *S = x.shape
    Cout, cig, *K = Wn.shape
    nd = len(S)
    s, p, d = (tuple(m.stride), tuple(m.padding), tuple(m.dilation))
    O = [(S[i] + 2 * p[i] - d[i] * (K[i] - 1) - 1) // s[i] + 1 for i in range(nd)]
    assert tuple(out_shape) == (B, Cout, *O), "reference conv output size disagrees with torch"
    cog = Cout // m.groups
    units, bias, bl = [], [], _bias(m)
    for n in range(B):
        for co in range(Cout):
            g = co // cog
            for o in itertools.product(*map(range, O)):
                contribs = []
                for cl in range(cig):
                    ci = g * cig + cl
                    for k in itertools.product(*map(range, K)):
                        pos = tuple(o[i] * s[i] - p[i] + k[i] * d[i] for i in range(nd))
                        if all(0 <= pos[i] < S[i] for i in range(nd)):
                            flat = int(np.ravel_multi_index((n, ci, *pos), xn.shape))
                            contribs.append((float(Wn[(co, cl, *k)] * xn[(n, ci, *pos)]),
                                             [(0, flat, 1.0)]))
                units.append(contribs)
                bias.append(0.0 if bl is None else bl[co])
    return units, bias


def convt_units(x: Tensor, m: nn.Module, out_shape):
    """Transposed conv: y[n, co, o] = Σ over (ci, k, q) with o = q·s - p + k·d of
    W[ci, co', k]·x[n, ci, q] + b[co]."""
    xn, Wn = _np(x), _np(m.weight)
    B, Cin, *S = x.shape
    _, cog, *K = Wn.shape
    nd = len(S)
    s, p, d = tuple(m.stride), tuple(m.padding), tuple(m.dilation)
    op = tuple(m.output_padding)
    O = [(S[i] - 1) * s[i] - 2 * p[i] + d[i] * (K[i] - 1) + op[i] + 1 for i in range(nd)]
    Cout = cog * m.groups
    assert tuple(out_shape) == (B, Cout, *O), "reference conv-transpose size disagrees"
    cig = Cin // m.groups
    units, bias, bl = [], [], _bias(m)
    for n in range(B):
        for co in range(Cout):
            g, cl_out = divmod(co, cog)
            for o in itertools.product(*map(range, O)):
                contribs = []
                for ci in range(g * cig, (g + 1) * cig):
                    for k in itertools.product(*map(range, K)):
                        num = [o[i] + p[i] - k[i] * d[i] for i in range(nd)]
                        if any(v % s[i] for i, v in enumerate(num)):
                            continue
                        q = tuple(v // s[i] for i, v in enumerate(num))
                        if all(0 <= q[i] < S[i] for i in range(nd)):
                            flat = int(np.ravel_multi_index((n, ci, *q), xn.shape))
                            contribs.append((float(Wn[(ci, cl_out, *k)] * xn[(n, ci, *q)]),
                                             [(0, flat, 1.0)]))
                units.append(contribs)
                bias.append(0.0 if bl is None else bl[co])
    return units, bias


def bilinear_units(x1: Tensor, x2: Tensor, m: nn.Bilinear):
    """y[r, k] = Σ_{i,j} W[k, i, j]·x1[r, i]·x2[r, j] + b[k]; each pair's share is split
    half to x1_i and half to x2_j."""
    a1, a2, Wn = _np(x1).reshape(-1, x1.shape[-1]), _np(x2).reshape(-1, x2.shape[-1]), _np(
        m.weight)
    n1, n2 = a1.shape[1], a2.shape[1]
    units, bias, bl = [], [], _bias(m)
    for r in range(a1.shape[0]):
        for k in range(Wn.shape[0]):
            units.append([
                (float(Wn[k, i, j] * a1[r, i] * a2[r, j]),
                 [(0, r * n1 + i, 0.5), (1, r * n2 + j, 0.5)])
                for i in range(n1) for j in range(n2)
            ])
            bias.append(0.0 if bl is None else bl[k])
    return units, bias


def layer_units(m: nn.Module, x: Tensor):
    out = m(x)
    if isinstance(m, nn.Linear):
        return linear_units(x, m.weight, m.bias)
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return conv_units(x, m, out.shape)
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return convt_units(x, m, out.shape)
    raise TypeError(type(m))


# ---------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------
def as_tensor(vals: list[float], like: Tensor) -> Tensor:
    return torch.tensor(vals, dtype=D).reshape(like.shape)


def close(got: Tensor, ref: Tensor, scale: float, what: str, rtol: float = RTOL) -> None:
    """Element-wise agreement to ``rtol`` of the relevance scale."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    got = got.detach().to(D)
    err = (got - ref).abs().max().item() if ref.numel() else 0.0
    tol = rtol * max(scale, 1e-300)
    assert err <= tol, (
        f"{what}: package differs from the METHOD.md reference by {err:.3e} (tol {tol:.1e})\n"
        f"package  ={got.flatten()[:12].tolist()}\nreference={ref.flatten()[:12].tolist()}"
    )


def close_scalar(got: float, ref: float, scale: float, what: str, rtol: float = RTOL) -> None:
    assert abs(got - ref) <= rtol * max(scale, 1e-300), f"{what}: package {got} vs reference {ref}"


def ledger_entry(exp: dlb.Explanation, key: str):
    for e in exp.ledger:
        if e.key == key:
            return e
    raise KeyError(key)


def rand(*shape: int, gen: torch.Generator, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=D) * scale


def init_(m: nn.Module, gen: torch.Generator) -> nn.Module:
    """Random float64 parameters (deterministic per generator)."""
    m = m.to(D)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=D))
    return m.eval()


# ---------------------------------------------------------------------------------------
# §2 default mode, saturation off: real modules as the last layer, seed = explicit tensor
# ---------------------------------------------------------------------------------------
def check_default(layer: nn.Module, x: Tensor, gen: torch.Generator, act: type | None = None,
                  saturation: bool = False, expect_saturation: bool = False) -> None:
    model = nn.Sequential(layer) if act is None else nn.Sequential(layer, make_act(act))
    with torch.no_grad():
        y = model(x)
    seed = rand(*y.shape, gen=gen)
    exp = dlb.explain(model, x, target=seed, mode="default", saturation=saturation)
    units, bias = layer_units(layer, x)
    bounds = BOUNDS[act] if (act is not None and saturation) else None
    (ref,), absorbed, n_sat = ref_default(units, bias, seed.flatten().tolist(), [x.numel()],
                                          bounds)
    scale = seed.abs().sum().item()
    close(exp.at("0"), as_tensor(ref, x), scale, f"{type(layer).__name__} input relevance")
    close(exp.inputs["input"], as_tensor(ref, x), scale, "model input relevance")
    close_scalar(exp.absorbed["0"], absorbed, scale, f"{type(layer).__name__} absorbed (bias)")
    if expect_saturation:
        assert n_sat > 0, "test setup: no unit saturated; scale the inputs up"
        (plain,), _, _ = ref_default(units, bias, seed.flatten().tolist(), [x.numel()], None)
        assert max(abs(a - b) for a, b in zip(plain, ref)) > 1e-6, "saturation changed nothing"
    elif act is not None:  # saturation off: units that would saturate are not treated so
        _, _, would = ref_default(units, bias, seed.flatten().tolist(), [x.numel()],
                                  BOUNDS[act])
        assert would > 0, "test setup: no unit would saturate"


@given(seed=st.integers(0, 2**31 - 1), bias=st.booleans(), three_d=st.booleans())
@HYP
def test_linear_default(seed: int, bias: bool, three_d: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    layer = init_(nn.Linear(5, 4, bias=bias), gen)
    x = rand(2, 3, 5, gen=gen) if three_d else rand(3, 5, gen=gen)
    check_default(layer, x, gen)


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_linear_few_live_units_of_a_wide_layer(mode: str) -> None:
    """A wide layer (an LM head's vocabulary) whose relevance sits on a few units works on
    those units only; the result equals the full rule (the slow reference in default
    mode, the full-width path in both)."""
    from dlbhooks.rules import linear

    gen = torch.Generator().manual_seed(5)
    width = linear.LIVE_UNITS_MIN
    layer = init_(nn.Linear(6, width), gen)
    x = rand(3, 6, gen=gen)
    seed = torch.zeros(3, width, dtype=D)
    seed[0, 7], seed[1, 7], seed[2, width - 1] = 2.0, -1.0, 3.0
    calls = []
    real = linear._live_units
    linear._live_units = lambda R: calls.append(1) or real(R)
    try:
        fast = dlb.explain(layer, x, target=seed, mode=mode, saturation=False)
    finally:
        linear._live_units = real
    assert calls, "the wide layer was not checked for live units"
    old = linear.LIVE_UNITS_MIN
    linear.LIVE_UNITS_MIN = width + 1  # the full-width path
    try:
        full = dlb.explain(layer, x, target=seed, mode=mode, saturation=False)
    finally:
        linear.LIVE_UNITS_MIN = old
    torch.testing.assert_close(fast.inputs["input"], full.inputs["input"], rtol=1e-12,
                               atol=1e-12)
    assert fast.absorbed["<root>"] == pytest.approx(full.absorbed["<root>"], rel=1e-12)
    if mode == "default":
        units, bias = layer_units(layer, x)
        (ref,), absorbed, _ = ref_default(units, bias, seed.flatten().tolist(), [x.numel()],
                                          None)
        close(fast.inputs["input"], as_tensor(ref, x), 6.0, "wide layer input relevance")


def test_linear_default_activation_with_saturation_off() -> None:
    """saturation=False: a following Tanh changes nothing even when units saturate."""
    gen = torch.Generator().manual_seed(1)
    layer = init_(nn.Linear(6, 5), gen)
    check_default(layer, rand(4, 6, gen=gen, scale=4.0), gen, act=nn.Tanh, saturation=False)


def test_linear_zero_unit_is_lost() -> None:
    """T_j = 0 (no weights, no bias): nothing is given, all of R_j is reported absorbed."""
    gen = torch.Generator().manual_seed(2)
    layer = init_(nn.Linear(4, 3), gen)
    with torch.no_grad():
        layer.weight[1] = 0
        layer.bias[1] = 0
    check_default(layer, rand(2, 4, gen=gen), gen)


CONV2D_CFGS = st.fixed_dictionaries({
    "k": st.integers(1, 3), "stride": st.integers(1, 2), "padding": st.integers(0, 2),
    "dilation": st.integers(1, 2), "groups": st.sampled_from([1, 2]), "bias": st.booleans(),
    "size": st.integers(4, 6), "seed": st.integers(0, 2**31 - 1),
})


@given(cfg=CONV2D_CFGS)
@HYP
def test_conv2d_default(cfg: dict) -> None:
    gen = torch.Generator().manual_seed(cfg["seed"])
    layer = init_(nn.Conv2d(4, 4, cfg["k"], stride=cfg["stride"], padding=cfg["padding"],
                            dilation=cfg["dilation"], groups=cfg["groups"], bias=cfg["bias"]),
                  gen)
    size = max(cfg["size"], cfg["dilation"] * (cfg["k"] - 1) + 2)  # output at least 1 wide
    x = rand(1, 4, size, size - 1, gen=gen)
    check_default(layer, x, gen)


@pytest.mark.parametrize("kw", [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
    dict(kernel_size=2, dilation=2, padding=2, groups=2),
])
def test_conv1d_default(kw: dict) -> None:
    gen = torch.Generator().manual_seed(3)
    layer = init_(nn.Conv1d(4, 6, **kw), gen)
    check_default(layer, rand(2, 4, 7, gen=gen), gen)


def test_conv2d_rectangular_kernel_default() -> None:
    gen = torch.Generator().manual_seed(4)
    layer = init_(nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(1, 0), dilation=(1, 2)), gen)
    check_default(layer, rand(2, 2, 5, 6, gen=gen), gen)


def test_conv3d_default() -> None:
    gen = torch.Generator().manual_seed(5)
    layer = init_(nn.Conv3d(2, 2, 2, stride=(1, 2, 1), padding=(0, 1, 1)), gen)
    check_default(layer, rand(1, 2, 3, 4, 3, gen=gen), gen)


@pytest.mark.parametrize("cls,shape,kw", [
    (nn.ConvTranspose1d, (2, 4, 5), dict(kernel_size=3, stride=2, output_padding=1)),
    (nn.ConvTranspose1d, (1, 4, 4), dict(kernel_size=2, stride=3, padding=1, dilation=2,
                                         output_padding=2, groups=2, bias=False)),
    (nn.ConvTranspose2d, (1, 2, 3, 4), dict(kernel_size=3, stride=2, padding=1,
                                            output_padding=1)),
    (nn.ConvTranspose2d, (1, 4, 3, 3), dict(kernel_size=(2, 3), stride=(2, 1), groups=2)),
])
def test_conv_transpose_default(cls, shape, kw) -> None:
    gen = torch.Generator().manual_seed(6)
    layer = init_(cls(shape[1], 4, **kw), gen)
    check_default(layer, rand(*shape, gen=gen), gen)


# ---------------------------------------------------------------------------------------
# §2 default mode with saturation on: the activation module follows the layer
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("act,scale", [
    (nn.Tanh, 2.0), (nn.Sigmoid, 3.0), (nn.Softmax, 1.5), (nn.SiLU, 5.0), (nn.ReLU, 1.0),
])
def test_linear_saturation(act: type, scale: float) -> None:
    gen = torch.Generator().manual_seed(7)
    layer = init_(nn.Linear(6, 5), gen)
    check_default(layer, rand(4, 6, gen=gen, scale=scale), gen, act=act, saturation=True,
                  expect_saturation=True)


@pytest.mark.parametrize("act,scale", [(nn.Tanh, 1.5), (nn.Sigmoid, 3.0), (nn.ReLU, 1.0)])
def test_conv_saturation(act: type, scale: float) -> None:
    gen = torch.Generator().manual_seed(8)
    layer = init_(nn.Conv2d(2, 3, 3, padding=1, stride=2), gen)
    check_default(layer, rand(1, 2, 5, 5, gen=gen, scale=scale), gen, act=act,
                  saturation=True, expect_saturation=True)
    layer1 = init_(nn.Conv1d(2, 3, 2, dilation=2), gen)
    check_default(layer1, rand(2, 2, 6, gen=gen, scale=scale), gen, act=act,
                  saturation=True, expect_saturation=True)


def test_conv_transpose_saturation() -> None:
    gen = torch.Generator().manual_seed(9)
    layer = init_(nn.ConvTranspose2d(2, 3, 3, stride=2, output_padding=1), gen)
    check_default(layer, rand(1, 2, 3, 3, gen=gen, scale=2.0), gen, act=nn.Tanh,
                  saturation=True, expect_saturation=True)


def test_saturation_only_side_without_bias_or_movers_is_lost() -> None:
    """Saturated low with no negative contribution and no bias: T_j = 0, R_j absorbed."""
    layer = nn.Linear(2, 1, bias=False).to(D)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0]], dtype=D))
    x = torch.tensor([[-3.0, -2.0], [1.0, -4.0], [0.5, 0.25]], dtype=D)  # t=-7, -7, 1
    gen = torch.Generator().manual_seed(10)
    check_default(layer, x, gen, act=nn.Tanh, saturation=True, expect_saturation=True)


# ---------------------------------------------------------------------------------------
# §2 contrastive mode: layer -> ReLU -> layer2 so both streams reach the first layer
# ---------------------------------------------------------------------------------------
def check_contrastive(l1: nn.Module, l2: nn.Module, x: Tensor, gen: torch.Generator,
                      act: type = nn.ReLU) -> Counter:
    model = nn.Sequential(l1, make_act(act), l2)
    with torch.no_grad():
        h = l1(x)
        a2 = model[1](h)
        y = l2(a2)
    seed = rand(*y.shape, gen=gen)
    exp = dlb.explain(model, x, target=seed, mode="contrastive")
    u2, b2 = layer_units(l2, a2)
    (p2,), (n2,), lost2, c2 = ref_contrastive(
        u2, b2, seed.clamp_min(0).flatten().tolist(), (-seed).clamp_min(0).flatten().tolist(),
        [a2.numel()])
    # the activation passes both streams through element-wise
    u1, b1 = layer_units(l1, x)
    (p1,), (n1,), lost1, c1 = ref_contrastive(u1, b1, p2, n2, [x.numel()])
    scale, tol = seed.abs().sum().item(), RTOL
    close(exp.at("2"), as_tensor(p2, a2) - as_tensor(n2, a2), scale, "second layer (net)", tol)
    close(exp.positive["input"], as_tensor(p1, x), scale, "first layer, + stream", tol)
    close(exp.negative["input"], as_tensor(n1, x), scale, "first layer, - stream", tol)
    close(exp.inputs["input"], as_tensor(p1, x) - as_tensor(n1, x), scale, "input (net)", tol)
    for key, lost in (("2", lost2), ("0", lost1)):
        e = ledger_entry(exp, key)
        close_scalar(e.absorbed[0], lost[0], scale, f"layer {key} absorbed, + stream", tol)
        close_scalar(e.absorbed[1], lost[1], scale, f"layer {key} absorbed, - stream", tol)
    return c1 + c2


@given(seed=st.integers(0, 2**31 - 1), bias=st.booleans())
@HYP
def test_linear_contrastive(seed: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    l1, l2 = init_(nn.Linear(5, 6, bias=bias), gen), init_(nn.Linear(6, 4, bias=bias), gen)
    check_contrastive(l1, l2, rand(3, 5, gen=gen), gen, act=nn.Tanh)


@pytest.mark.parametrize("cin,bias,stride,pad", [(3, True, 2, 1), (5, False, 1, 1),
                                                  (2, True, 1, 0)])
def test_conv2d_contrastive(cin: int, bias: bool, stride: int, pad: int) -> None:
    """Both streams through two convolutions (batch 2: the streams are stacked along the
    batch for one adjoint product each; few input channels take the phase-decomposed
    adjoint) against the slow per-element reference."""
    gen = torch.Generator().manual_seed(31 + cin)
    l1 = init_(nn.Conv2d(cin, 4, 3, stride=stride, padding=pad, bias=bias), gen)
    l2 = init_(nn.Conv2d(4, 3, 2, bias=bias), gen)
    check_contrastive(l1, l2, rand(2, cin, 7, 6, gen=gen), gen)


def test_linear_contrastive_all_cases() -> None:
    """Aligned, crossed, degenerate (P_j = 0 or N_j = 0) and lost (P_j = N_j = 0) units."""
    gen = torch.Generator().manual_seed(11)
    l1, l2 = init_(nn.Linear(5, 6), gen), init_(nn.Linear(6, 5), gen)
    x = rand(4, 5, gen=gen)
    with torch.no_grad():
        x[0] = x[0].abs()
        l1.weight[0] = l1.weight[0].abs()      # unit (0, 0) of layer 1: N = 0
        l2.weight[0] = l2.weight[0].abs()      # ReLU inputs >= 0: N = 0 for unit 0
        l2.weight[1] = -l2.weight[1].abs()     # P = 0 for unit 1
        l2.weight[2] = 0.0                     # P = N = 0: lost (bias does not keep it)
    cases = check_contrastive(l1, l2, x, gen)
    for case in ("aligned", "crossed", "degenerate", "lost"):
        assert cases[case] > 0, f"test setup: no {case} unit ({dict(cases)})"


def test_linear_contrastive_exact_degenerate_with_bias() -> None:
    """A unit whose contributions are all positive is degenerate (N_j = 0 exactly): the
    - stream must be split ∝ |w·a| over the positive contributions."""
    l1 = nn.Linear(3, 2).to(D)
    with torch.no_grad():
        l1.weight.copy_(torch.tensor([[0.3, 0.7, 0.1], [0.2, -0.5, 0.9]], dtype=D))
        l1.bias.copy_(torch.tensor([0.1, -0.3], dtype=D))
    x = torch.tensor([[0.4, 0.6, 0.25]], dtype=D)
    model = nn.Sequential(l1)
    seed = torch.tensor([[2.0, -1.0]], dtype=D)
    exp = dlb.explain(model, x, target=seed, mode="contrastive")
    units, bias = linear_units(x, l1.weight, l1.bias)
    (p,), (n,), _, cases = ref_contrastive(units, bias, [2.0, 0.0], [0.0, 1.0], [3])
    assert cases["degenerate"] == 1
    close(exp.positive["input"], as_tensor(p, x), 3.0, "degenerate unit, + stream")
    close(exp.negative["input"], as_tensor(n, x), 3.0, "aligned unit, - stream")


def test_contrastive_degenerate_after_relu() -> None:
    """Units fed by a ReLU whose weights are all >= 0 have N_j = 0 exactly, but the package
    sees P_j - N_j through the recorded output minus a large bias (rounding noise). With
    t_j <= 0 and R+_j <= R-_j such a unit would be 'aligned' and send R-_j to negative
    contributions that do not exist; METHOD §2 says: split ∝ |w·a| over the ones that do."""
    gen = torch.Generator().manual_seed(12)
    l1, l2 = init_(nn.Linear(4, 8), gen), init_(nn.Linear(8, 3), gen)
    with torch.no_grad():
        l2.weight.copy_(l2.weight.abs())       # every unit of layer 2 is degenerate
        l2.bias.fill_(-100.0)                  # t_j <= 0
    model = nn.Sequential(l1, nn.ReLU(), l2)
    x = rand(5, 4, gen=gen)
    with torch.no_grad():
        a2 = model[1](l1(x))
        y = l2(a2)
    seed = -torch.rand(y.shape, generator=gen, dtype=D)  # only the - stream: aligned
    seed[0, 0] = 0.5                                      # one unit with R+ > R- = 0
    exp = dlb.explain(model, x, target=seed, mode="contrastive")
    u2, b2 = linear_units(a2, l2.weight, l2.bias)
    (p2,), (n2,), lost, cases = ref_contrastive(
        u2, b2, seed.clamp_min(0).flatten().tolist(), (-seed).clamp_min(0).flatten().tolist(),
        [a2.numel()])
    assert cases["degenerate"] > 0 and set(cases) == {"degenerate"}
    assert lost == (0.0, 0.0)
    msg = ("degenerate units (N_j = 0) of a Linear after ReLU "
           "(METHOD §2: split ∝ |w·a| over the contributions that exist)")
    scale = seed.abs().sum().item()
    close(exp.at("2"), as_tensor(p2, a2) - as_tensor(n2, a2), scale, msg)
    e = ledger_entry(exp, "2")
    close_scalar(e.relevance_in[1], sum(n2), scale, msg + ": - stream not conserved")
    close_scalar(e.relevance_in[0], sum(p2), scale, msg + ": + stream not conserved")


@pytest.mark.parametrize("kind", ["conv1d", "conv2d", "conv3d", "convt1d", "convt2d"])
def test_conv_contrastive(kind: str) -> None:
    gen = torch.Generator().manual_seed(13)
    if kind == "conv1d":
        l1 = nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2)
        l2 = nn.Conv1d(4, 3, 2, dilation=2)
        x = rand(2, 2, 8, gen=gen)
    elif kind == "conv2d":
        l1 = nn.Conv2d(2, 4, 3, padding=1, dilation=2)
        l2 = nn.Conv2d(4, 2, 2, stride=2, groups=2)
        x = rand(1, 2, 5, 5, gen=gen)
    elif kind == "conv3d":
        l1 = nn.Conv3d(2, 2, 2, padding=1)
        l2 = nn.Conv3d(2, 2, 2, stride=2, bias=False)
        x = rand(1, 2, 3, 3, 3, gen=gen)
    elif kind == "convt1d":
        l1 = nn.ConvTranspose1d(2, 3, 3, stride=2, output_padding=1)
        l2 = nn.ConvTranspose1d(3, 2, 2, stride=2, padding=1)
        x = rand(2, 2, 4, gen=gen)
    else:
        l1 = nn.ConvTranspose2d(2, 2, 2, stride=2, output_padding=1, dilation=2)
        l2 = nn.ConvTranspose2d(2, 2, 3, padding=1, groups=2)
        x = rand(1, 2, 3, 3, gen=gen)
    cases = check_contrastive(init_(l1, gen), init_(l2, gen), x, gen, act=nn.Tanh)
    assert cases["aligned"] > 0 and cases["crossed"] > 0, dict(cases)


# ---------------------------------------------------------------------------------------
# Bilinear: §2 over pair contributions, half of each pair's share to each factor
# ---------------------------------------------------------------------------------------
class BilinearNet(nn.Module):
    def __init__(self, bil: nn.Bilinear, act: nn.Module | None = None):
        super().__init__()
        self.bil = bil
        self.act = act if act is not None else nn.Identity()

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.act(self.bil(x1, x2))


@pytest.mark.parametrize("mode,act,bias", [
    ("default", None, True), ("default", None, False), ("default", nn.Tanh, True),
    ("contrastive", None, True),
])
def test_bilinear(mode: str, act: type | None, bias: bool) -> None:
    gen = torch.Generator().manual_seed(14)
    bil = init_(nn.Bilinear(3, 4, 5, bias=bias), gen)
    sc = 2.0 if act is not None else 1.0
    x1, x2 = rand(2, 3, gen=gen, scale=sc), rand(2, 4, gen=gen, scale=sc)
    model = BilinearNet(bil, make_act(act) if act is not None else None)
    with torch.no_grad():
        y = model(x1, x2)
    seed = rand(*y.shape, gen=gen)
    scale = seed.abs().sum().item()
    exp = dlb.explain(model, (x1, x2), target=seed, mode=mode, saturation=act is not None)
    units, bias_l = bilinear_units(x1, x2, bil)
    if mode == "default":
        bounds = BOUNDS[act] if act is not None else None
        (r1, r2), absorbed, n_sat = ref_default(units, bias_l, seed.flatten().tolist(),
                                                [x1.numel(), x2.numel()], bounds)
        if act is not None:
            assert n_sat > 0, "test setup: no unit saturated"
        close(exp.inputs["x1"], as_tensor(r1, x1), scale, "Bilinear x1")
        close(exp.inputs["x2"], as_tensor(r2, x2), scale, "Bilinear x2")
        close_scalar(exp.absorbed["bil"], absorbed, scale, "Bilinear absorbed")
    else:
        (p1, p2), (n1, n2), _, _ = ref_contrastive(
            units, bias_l, seed.clamp_min(0).flatten().tolist(),
            (-seed).clamp_min(0).flatten().tolist(), [x1.numel(), x2.numel()])
        close(exp.positive["x1"], as_tensor(p1, x1), scale, "Bilinear x1, + stream")
        close(exp.negative["x1"], as_tensor(n1, x1), scale, "Bilinear x1, - stream")
        close(exp.positive["x2"], as_tensor(p2, x2), scale, "Bilinear x2, + stream")
        close(exp.negative["x2"], as_tensor(n2, x2), scale, "Bilinear x2, - stream")


def test_bilinear_contrastive_tiny_side() -> None:
    """Units whose small side is one pair of 1e-13 next to pairs of order 1, with inputs of
    either sign (row 0 positive, row 1 mixed) and both streams on every unit, so the small
    side carries one of them: P and N are summed per sign combination of W, x1 and x2, and
    each stream is conserved and matches the reference. (From (Σ|c| ∓ Σc)/2, 1/side was
    off by ~eps (P + N) / side: the call leaked 3.8e-4 of its + stream and differed from the
    reference by 3.9e-5 of the scale; now 0 and 1.6e-17.)"""
    bil = nn.Bilinear(2, 3, 3).to(D)
    w0 = [[1.0, 0.5, 0.25], [0.75, -1e-13, 0.5]]  # row 0: one tiny negative pair
    w1 = [[-1.0, 0.5, -0.25], [0.75, -0.5, -1e-13]]  # row 1: one tiny negative pair
    with torch.no_grad():
        bil.weight.copy_(torch.tensor([w0, w1, [[-v for v in r] for r in w0]], dtype=D))
        bil.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=D))
    x1 = torch.tensor([[1.0, 2.0], [-1.0, 2.0]], dtype=D)
    x2 = torch.tensor([[1.0, 1.5, 0.5], [1.0, -1.5, 0.5]], dtype=D)
    with dlb.trace(bil) as tape:
        bil(x1, x2)
    rec = tape.roots[-1]
    # the tiny sides (units 0 and 2 of row 0, unit 1 of row 1) get R- (aligned, t > 0),
    # R+ (aligned, t < 0) and R+ (crossed, t > 0)
    rp = torch.tensor([[1.0, 0.3, 0.5], [0.2, 0.1, 0.4]], dtype=D)
    rn = torch.tensor([[0.4, 0.8, 0.7], [0.6, 0.9, 1.1]], dtype=D)
    engine = Engine(tape, mode="contrastive")
    r1, r2 = engine.propagate(rec, [torch.stack((rp, rn))])
    absorbed = engine.ledger[0].absorbed
    units, bias_l = bilinear_units(x1, x2, bil)
    (p1, p2), (n1, n2), lost, cases = ref_contrastive(
        units, bias_l, rp.flatten().tolist(), rn.flatten().tolist(), [x1.numel(), x2.numel()])
    assert cases["aligned"] > 0 and cases["crossed"] > 0, dict(cases)
    for a, b, R in ((r1[0], r2[0], rp), (r1[1], r2[1], rn)):  # nothing is lost here
        assert abs(float(a.sum() + b.sum() - R.sum())) <= 1e-14 * float(R.sum())
    scale = float(rp.sum() + rn.sum())
    close(r1[0], as_tensor(p1, x1), scale, "x1, + stream")
    close(r1[1], as_tensor(n1, x1), scale, "x1, - stream")
    close(r2[0], as_tensor(p2, x2), scale, "x2, + stream")
    close(r2[1], as_tensor(n2, x2), scale, "x2, - stream")
    close_scalar(absorbed[0], lost[0], scale, "absorbed, + stream")
    close_scalar(absorbed[1], lost[1], scale, "absorbed, - stream")


# ---------------------------------------------------------------------------------------
# Add and product helpers (§3), with broadcasting
# ---------------------------------------------------------------------------------------
def src_index(idx: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The element of a tensor of ``shape`` that was broadcast to position ``idx``."""
    tail = idx[len(idx) - len(shape):]
    return tuple(0 if s == 1 else i for i, s in zip(tail, shape))


def ref_add(R: Tensor, terms: list[Tensor]) -> tuple[list[Tensor], float]:
    """R_k = R·|a_k| / Σ|a| at every element of the broadcast output, summed back."""
    Rn = _np(R)
    tn = [_np(t) for t in terms]
    parts = [np.zeros(t.shape) for t in tn]
    lost = 0.0
    for idx in np.ndindex(*Rn.shape):
        vals = [abs(float(t[src_index(idx, t.shape)])) for t in tn]
        tot = sum(vals)
        if tot == 0:
            lost += float(Rn[idx])
            continue
        for k, t in enumerate(tn):
            parts[k][src_index(idx, t.shape)] += float(Rn[idx]) * vals[k] / tot
    return [torch.tensor(p, dtype=D) for p in parts], lost


@given(seed=st.integers(0, 2**31 - 1), shapes=st.sampled_from([
    [(2, 3, 4), (2, 3, 4)],
    [(2, 3, 4), (3, 1), (1, 4)],
    [(2, 3, 4), (4,), (2, 1, 1), (1,)],
    [(3, 4), (2, 3, 4)],
]), zeros=st.booleans())
@HYP
def test_add_rule(seed: int, shapes: list, zeros: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    terms = [rand(*s, gen=gen) for s in shapes]
    if zeros:  # some positions where every term is 0: lost
        terms = [torch.where(torch.rand(s, generator=gen, dtype=D) < 0.5, t, 0.0)
                 for s, t in zip(shapes, terms)]
    out_shape = torch.broadcast_shapes(*[t.shape for t in terms])
    R = rand(*out_shape, gen=gen)
    parts, lost = add_rule(R, terms)
    ref_parts, ref_lost = ref_add(R, terms)
    scale = R.abs().sum().item()
    for k, (p, q) in enumerate(zip(parts, ref_parts)):
        close(p, q, scale, f"add rule term {k} {tuple(shapes[k])}")
    close_scalar(float(lost), ref_lost, scale, "add rule lost")


def test_add_rule_lost_when_all_zero() -> None:
    a = torch.tensor([[0.0, 1.0], [0.0, -2.0]], dtype=D)
    b = torch.tensor([0.0, 3.0], dtype=D)
    R = torch.tensor([[1.0, 2.0], [4.0, 8.0]], dtype=D)
    parts, lost = add_rule(R, [a, b])
    ref_parts, ref_lost = ref_add(R, [a, b])
    assert ref_lost == 5.0
    close_scalar(float(lost), ref_lost, 15.0, "add rule lost")
    for p, q in zip(parts, ref_parts):
        close(p, q, 15.0, "add rule")


@pytest.mark.parametrize("shapes", [[(2, 3), (2, 3)], [(2, 3, 4), (3, 1)], [(4,), (2, 3, 4)]])
def test_product_rule(shapes: list) -> None:
    gen = torch.Generator().manual_seed(15)
    factors = [rand(*s, gen=gen) for s in shapes]
    out_shape = torch.broadcast_shapes(*[f.shape for f in factors])
    R = rand(*out_shape, gen=gen)
    parts = product_rule(R, factors)
    Rn = _np(R)
    for k, f in enumerate(factors):
        ref = np.zeros(tuple(f.shape))
        for idx in np.ndindex(*Rn.shape):
            ref[src_index(idx, tuple(f.shape))] += 0.5 * float(Rn[idx])
        close(parts[k], torch.tensor(ref, dtype=D), R.abs().sum().item(), f"product factor {k}")
    assert abs(sum(float(p.sum()) for p in parts) - float(R.sum())) < 1e-12 * float(R.abs().sum())


# ---------------------------------------------------------------------------------------
# Norms (§3): x -> x̂ element-wise, then y = γ·x̂ + β by the §2 rule element-wise
# ---------------------------------------------------------------------------------------
def ref_affine(R: list[float], xhat: list[float], gamma: list[float] | None,
               beta: list[float] | None) -> tuple[list[float], float]:
    out, lost = [], 0.0
    for i, r in enumerate(R):
        if beta is None:
            out.append(r)
            continue
        s = abs(xhat[i] * (gamma[i] if gamma is not None else 1.0))
        den = s + abs(beta[i])
        out.append(r * s / den if den != 0 else 0.0)
        lost += r - out[-1]
    return out, lost


def normalise(vals: list[float], eps: float, mean: float | None = None,
              var: float | None = None) -> list[float]:
    n = len(vals)
    mu = sum(vals) / n if mean is None else mean
    v = sum((a - mu) ** 2 for a in vals) / n if var is None else var
    return [(a - mu) / math.sqrt(v + eps) for a in vals]


def ref_norm(m: nn.Module, x: Tensor) -> tuple[list[float], list[float] | None,
                                               list[float] | None]:
    """x̂, γ and β per element of x (flat, C order), by explicit loops."""
    xn = _np(x)
    xhat = np.zeros(xn.shape)
    gamma = beta = None
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    if isinstance(m, nn.LayerNorm):
        k = len(m.normalized_shape)
        lead = xn.shape[:-k]
        for li in np.ndindex(*lead):
            block = xn[li].reshape(-1).tolist()
            xhat[li] = np.array(normalise(block, m.eps)).reshape(xn.shape[-k:])
        if w is not None:
            gamma = np.broadcast_to(_np(w), xn.shape)
        if b is not None:
            beta = np.broadcast_to(_np(b), xn.shape)
    else:
        C = xn.shape[1]
        chan_shape = (1, C) + (1,) * (xn.ndim - 2)
        if isinstance(m, nn.GroupNorm):
            cpg = C // m.num_groups
            for n in range(xn.shape[0]):
                for g in range(m.num_groups):
                    block = xn[n, g * cpg:(g + 1) * cpg]
                    xhat[n, g * cpg:(g + 1) * cpg] = np.array(
                        normalise(block.reshape(-1).tolist(), m.eps)).reshape(block.shape)
        else:  # BatchNorm: running stats in eval, batch stats (biased var) in training
            for c in range(C):
                block = xn[:, c]
                if m.training or m.running_mean is None:
                    vals = normalise(block.reshape(-1).tolist(), m.eps)
                else:
                    vals = normalise(block.reshape(-1).tolist(), m.eps,
                                     float(m.running_mean[c]), float(m.running_var[c]))
                xhat[:, c] = np.array(vals).reshape(block.shape)
        if w is not None:
            gamma = np.broadcast_to(_np(w).reshape(chan_shape), xn.shape)
        if b is not None:
            beta = np.broadcast_to(_np(b).reshape(chan_shape), xn.shape)
    flat = lambda a: None if a is None else a.reshape(-1).tolist()  # noqa: E731
    return xhat.reshape(-1).tolist(), flat(gamma), flat(beta)


def check_norm(m: nn.Module, x: Tensor, gen: torch.Generator, mode: str = "default") -> None:
    model = nn.Sequential(m)
    xhat, gamma, beta = ref_norm(m, x)  # before the forward (train-mode BN updates stats)
    with torch.no_grad():
        y = model(x.clone())
    if m.training:
        ref_y = torch.tensor(xhat, dtype=D).reshape(x.shape)
        if gamma is not None:
            ref_y = ref_y * torch.tensor(gamma, dtype=D).reshape(x.shape)
        if beta is not None:
            ref_y = ref_y + torch.tensor(beta, dtype=D).reshape(x.shape)
        assert torch.allclose(ref_y, y, rtol=0, atol=1e-12), "reference x̂ disagrees with the module"
    seed = rand(*y.shape, gen=gen)
    exp = dlb.explain(model, x, target=seed, mode=mode)
    scale = seed.abs().sum().item()
    if mode == "default":
        ref, lost = ref_affine(seed.flatten().tolist(), xhat, gamma, beta)
        close(exp.at("0"), as_tensor(ref, x), scale, f"{type(m).__name__} input relevance")
        close_scalar(exp.absorbed["0"], lost, scale, f"{type(m).__name__} absorbed (β)")
    else:
        for stream, R in (("positive", seed.clamp_min(0)), ("negative", (-seed).clamp_min(0))):
            ref, _ = ref_affine(R.flatten().tolist(), xhat, gamma, beta)
            close(getattr(exp, stream)["input"], as_tensor(ref, x), scale,
                  f"{type(m).__name__} {stream} stream")


@pytest.mark.parametrize("mode", ["default", "contrastive"])
@pytest.mark.parametrize("kind", ["affine", "no_affine", "no_bias", "2d_shape"])
def test_layer_norm(kind: str, mode: str) -> None:
    gen = torch.Generator().manual_seed(16)
    if kind == "affine":
        m = nn.LayerNorm(5)
    elif kind == "no_affine":
        m = nn.LayerNorm(5, elementwise_affine=False)
    elif kind == "no_bias":
        m = nn.LayerNorm(5, bias=False)
    else:
        m = nn.LayerNorm((3, 5), eps=1e-3)
    m = init_(m, gen)
    check_norm(m, rand(2, 3, 5, gen=gen, scale=2.0) + 0.5, gen, mode)


@pytest.mark.parametrize("mode", ["default", "contrastive"])
@pytest.mark.parametrize("kind", ["eval1d", "eval1d_seq", "eval2d", "train2d", "train1d",
                                  "no_stats"])
def test_batch_norm(kind: str, mode: str) -> None:
    gen = torch.Generator().manual_seed(17)
    if kind.startswith("eval1d"):
        m = nn.BatchNorm1d(4)
        x = rand(3, 4, 5, gen=gen) if kind == "eval1d_seq" else rand(3, 4, gen=gen)
    elif kind == "train1d":
        m = nn.BatchNorm1d(4)
        x = rand(5, 4, gen=gen)
    elif kind == "no_stats":
        m = nn.BatchNorm2d(3, track_running_stats=False)
        x = rand(2, 3, 3, 2, gen=gen)
    else:
        m = nn.BatchNorm2d(3, eps=1e-2)
        x = rand(2, 3, 3, 2, gen=gen)
    m = init_(m, gen)
    if m.running_mean is not None:  # non-trivial running statistics
        with torch.no_grad():
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=D))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=D) + 0.3)
    if kind.startswith("train"):
        m.train()
    check_norm(m, x * 2 + 0.3, gen, mode)


@pytest.mark.parametrize("mode", ["default", "contrastive"])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm(affine: bool, mode: str) -> None:
    gen = torch.Generator().manual_seed(18)
    m = init_(nn.GroupNorm(2, 4, affine=affine), gen)
    check_norm(m, rand(2, 4, 3, 2, gen=gen, scale=1.5), gen, mode)
    m3 = init_(nn.GroupNorm(3, 6, affine=affine), gen)
    check_norm(m3, rand(2, 6, 4, gen=gen), gen, mode)


# ---------------------------------------------------------------------------------------
# Pooling (§3): max -> winner (ties split equally); average / adaptive -> add rule
# ---------------------------------------------------------------------------------------
def _t(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def pool_windows(m: nn.Module, in_sizes: tuple[int, ...], out_sizes: tuple[int, ...]):
    """For each output position, the list of input positions its window reads."""
    nd = len(in_sizes)
    if "Adaptive" in type(m).__name__:
        per_dim = []
        for L, O in zip(in_sizes, out_sizes):
            per_dim.append([list(range(math.floor(o * L / O), math.ceil((o + 1) * L / O)))
                            for o in range(O)])
        return {o: list(itertools.product(*(per_dim[d][o[d]] for d in range(nd))))
                for o in itertools.product(*map(range, out_sizes))}
    k = _t(m.kernel_size, nd)
    s = _t(m.stride if m.stride else m.kernel_size, nd)
    p = _t(m.padding, nd)
    dil = _t(getattr(m, "dilation", 1), nd)
    windows = {}
    for o in itertools.product(*map(range, out_sizes)):
        members = []
        for kk in itertools.product(*map(range, k)):
            pos = tuple(o[d] * s[d] - p[d] + kk[d] * dil[d] for d in range(nd))
            if all(0 <= pos[d] < in_sizes[d] for d in range(nd)):
                members.append(pos)
        windows[o] = members
    return windows


def ref_pool(m: nn.Module, x: Tensor, R: Tensor, nd: int) -> tuple[Tensor, float, int]:
    """Returns (input relevance, lost, number of max windows with a tie)."""
    xn, Rn = _np(x), _np(R)
    lead, S, O = xn.shape[:-nd], xn.shape[-nd:], Rn.shape[-nd:]
    windows = pool_windows(m, S, O)
    is_max = "Max" in type(m).__name__
    out = np.zeros(xn.shape)
    lost, ties = 0.0, 0
    for li in np.ndindex(*lead):
        for o, members in windows.items():
            r = float(Rn[li + o])
            vals = [float(xn[li + q]) for q in members]
            assert members, "empty pooling window"
            if is_max:
                best = max(vals)
                winners = [q for q, v in zip(members, vals) if v == best]
                ties += len(winners) > 1
                for q in winners:
                    out[li + q] += r / len(winners)
            else:
                tot = sum(abs(v) for v in vals)
                if tot == 0:
                    lost += r
                    continue
                for q, v in zip(members, vals):
                    out[li + q] += r * abs(v) / tot
    return torch.tensor(out, dtype=D), lost, ties


def check_pool(m: nn.Module, x: Tensor, nd: int, gen: torch.Generator,
               expect_ties: bool = False, expect_lost: bool = False) -> None:
    model = nn.Sequential(m)
    with torch.no_grad():
        y = model(x)
    seed = rand(*y.shape, gen=gen)
    scale = seed.abs().sum().item()
    ref, lost, ties = ref_pool(m, x, seed, nd)
    for mode in ("default", "contrastive"):
        exp = dlb.explain(model, x, target=seed, mode=mode)
        if mode == "default":
            close(exp.at("0"), ref, scale, f"{m} input relevance")
            close_scalar(exp.absorbed["0"], lost, scale, f"{m} lost")
        else:
            rp, _, _ = ref_pool(m, x, seed.clamp_min(0), nd)
            rn, _, _ = ref_pool(m, x, (-seed).clamp_min(0), nd)
            close(exp.positive["input"], rp, scale, f"{m} + stream")
            close(exp.negative["input"], rn, scale, f"{m} - stream")
    if expect_ties:
        assert ties > 0, "test setup: no tied max window"
    if expect_lost:
        assert lost != 0, "test setup: no all-zero average window"


MAXPOOLS = [
    (nn.MaxPool1d(2), (2, 3, 8)),
    (nn.MaxPool1d(3, stride=2, padding=1), (2, 2, 9)),
    (nn.MaxPool1d(3, stride=2, ceil_mode=True), (1, 2, 8)),
    (nn.MaxPool1d(2, stride=1, dilation=2), (1, 2, 7)),
    (nn.MaxPool2d(2), (1, 2, 4, 6)),
    (nn.MaxPool2d(3, stride=2, padding=1), (1, 2, 5, 5)),
    (nn.MaxPool2d((2, 3), stride=(1, 2), ceil_mode=True), (2, 1, 5, 6)),
    (nn.MaxPool2d(2, stride=3, padding=1, dilation=2, ceil_mode=True), (1, 1, 7, 8)),
]


@pytest.mark.parametrize("m,shape", MAXPOOLS, ids=[repr(m) for m, _ in MAXPOOLS])
def test_max_pool_ties(m: nn.Module, shape: tuple) -> None:
    """Integer-valued inputs: many windows have tied maxima, which split equally."""
    gen = torch.Generator().manual_seed(19)
    x = torch.randint(-1, 2, shape, generator=gen).to(D)
    check_pool(m, x, len(shape) - 2, gen, expect_ties=True)


@pytest.mark.parametrize("m,shape", MAXPOOLS, ids=[repr(m) for m, _ in MAXPOOLS])
def test_max_pool_random(m: nn.Module, shape: tuple) -> None:
    gen = torch.Generator().manual_seed(20)
    check_pool(m, rand(*shape, gen=gen), len(shape) - 2, gen)


@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_index_path(ties: bool) -> None:
    """Windows with one winner go through ``max_pool2d_with_indices`` + ``scatter_add``;
    a tied window that carries relevance sends the whole pool to the splitting path. Both
    equal the general window-table implementation."""
    from dlbhooks.rules import pooling

    gen = torch.Generator().manual_seed(23)
    x = (torch.randint(-1, 2, (2, 3, 9, 8), generator=gen).to(D) if ties
         else rand(2, 3, 9, 8, gen=gen))
    m = nn.MaxPool2d(3, stride=2, padding=1)
    out = m(x)
    R = rand(*out.shape, gen=gen)
    used = []
    real = pooling._single_winners

    def spy(*args):
        res = real(*args)
        used.append(res is not None)
        return res

    pooling._single_winners = spy
    try:
        fast, lost = pooling.unfold_pool_relevance(R, x, 3, 2, 1, 1, "max", out)
    finally:
        pooling._single_winners = real
    assert used == [not ties]
    tables = pooling.regular_tables(x, out.shape[-2:], 3, 2, 1, 1)
    slow, slow_lost = pooling.pool_relevance(R, x, tables, "max")
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    assert abs(float(lost) - float(slow_lost)) < 1e-12 * float(R.abs().sum())


AVGPOOLS = [
    (nn.AvgPool1d(2), (2, 2, 6)),
    (nn.AvgPool1d(3, stride=2, padding=1, ceil_mode=True), (1, 2, 8)),
    (nn.AvgPool2d(2), (1, 2, 4, 4)),
    (nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (1, 2, 5, 6)),
    (nn.AvgPool2d((3, 2), stride=(2, 3), ceil_mode=True), (2, 1, 6, 7)),
    (nn.AdaptiveAvgPool1d(3), (2, 2, 7)),
    (nn.AdaptiveAvgPool2d((3, 2)), (1, 2, 5, 7)),
    (nn.AdaptiveAvgPool2d(1), (1, 3, 3, 3)),
    (nn.AdaptiveMaxPool1d(3), (2, 2, 7)),
    (nn.AdaptiveMaxPool2d((2, 3)), (1, 2, 5, 7)),
    (nn.AdaptiveMaxPool2d(4), (1, 1, 6, 5)),
]


@pytest.mark.parametrize("m,shape", AVGPOOLS, ids=[repr(m) for m, _ in AVGPOOLS])
def test_avg_and_adaptive_pools(m: nn.Module, shape: tuple) -> None:
    gen = torch.Generator().manual_seed(21)
    check_pool(m, rand(*shape, gen=gen), len(shape) - 2, gen)
    xi = torch.randint(-1, 2, shape, generator=gen).to(D)  # zeros (lost windows) and ties
    check_pool(m, xi, len(shape) - 2, gen)


def test_avg_pool_all_zero_window_is_lost() -> None:
    gen = torch.Generator().manual_seed(22)
    x = rand(1, 1, 4, 4, gen=gen)
    x[..., :2, :2] = 0
    check_pool(nn.AvgPool2d(2), x, 2, gen, expect_lost=True)
    x1 = rand(1, 2, 7, gen=gen)
    x1[..., 2:5] = 0
    check_pool(nn.AdaptiveAvgPool1d(3), x1, 1, gen, expect_lost=True)


# ---------------------------------------------------------------------------------------
# Embedding / EmbeddingBag (§3): a token's relevance is the sum over its vector
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding(padding_idx: int | None) -> None:
    gen = torch.Generator().manual_seed(23)
    emb = init_(nn.Embedding(7, 4, padding_idx=padding_idx), gen)
    if padding_idx is not None:
        with torch.no_grad():
            emb.weight[padding_idx] = 0
    idx = torch.tensor([[0, 3, 3, 6], [1, 0, 2, 5]])
    model = nn.Sequential(emb)
    seed = rand(2, 4, 4, gen=gen)
    for mode in ("default", "contrastive"):
        exp = dlb.explain(model, idx, target=seed, mode=mode)
        ref = torch.zeros(idx.shape, dtype=D)
        refp, refn = ref.clone(), ref.clone()
        for b, t, d in itertools.product(range(2), range(4), range(4)):
            r = float(seed[b, t, d])
            ref[b, t] += r
            refp[b, t] += max(r, 0.0)
            refn[b, t] += max(-r, 0.0)
        close(exp.inputs["input"], ref, seed.abs().sum().item(), f"Embedding {mode}")
        if mode == "contrastive":
            close(exp.positive["input"], refp, seed.abs().sum().item(), "Embedding + stream")
            close(exp.negative["input"], refn, seed.abs().sum().item(), "Embedding - stream")
    # behind a Linear, the all-zero padding vector gets no relevance at all
    if padding_idx is not None:
        lin = init_(nn.Linear(4, 3), gen)
        model2 = nn.Sequential(emb, lin)
        exp = dlb.explain(model2, idx, target=rand(2, 4, 3, gen=gen))
        assert torch.all(exp.inputs["input"][idx == padding_idx] == 0)
        h = emb(idx)
        seed2 = rand(2, 4, 3, gen=gen)
        exp = dlb.explain(model2, idx, target=seed2)
        units, bias = linear_units(h, lin.weight, lin.bias)
        (rh,), _, _ = ref_default(units, bias, seed2.flatten().tolist(), [h.numel()])
        ref_tok = as_tensor(rh, h).sum(-1)
        close(exp.inputs["input"], ref_tok, seed2.abs().sum().item(), "Embedding -> Linear")


class BagNet(nn.Module):
    def __init__(self, bag: nn.EmbeddingBag):
        super().__init__()
        self.bag = bag

    def forward(self, input: Tensor, offsets: Tensor | None = None,  # noqa: A002
                per_sample_weights: Tensor | None = None) -> Tensor:
        return self.bag(input, offsets, per_sample_weights=per_sample_weights)


def ref_bag(m: nn.EmbeddingBag, idx: Tensor, offsets: Tensor | None, psw: Tensor | None,
            R: Tensor) -> tuple[Tensor, float, int]:
    """Bag members by explicit offsets; sum/mean ∝ |v_md| per dimension, max to each
    dimension's winners (ties split). Returns (per index, lost, #tied (bag, dim))."""
    flat = idx.reshape(-1).tolist()
    w = psw.reshape(-1).tolist() if psw is not None else [1.0] * len(flat)
    if idx.dim() == 2:
        L = idx.shape[1]
        bags = [list(range(b * L, (b + 1) * L)) for b in range(idx.shape[0])]
    else:
        offs = offsets.tolist()
        if not m.include_last_offset:
            offs = offs + [len(flat)]
        bags = [list(range(offs[b], offs[b + 1])) for b in range(len(offs) - 1)]
    W = _np(m.weight)
    out = [0.0] * len(flat)
    lost, ties = 0.0, 0
    for b, members in enumerate(bags):
        members = [q for q in members if m.padding_idx is None or flat[q] != m.padding_idx]
        for d in range(W.shape[1]):
            r = float(R[b, d])
            vals = [float(W[flat[q], d]) * w[q] for q in members]
            if not members:
                lost += r
                continue
            if m.mode == "max":
                best = max(vals)
                win = [q for q, v in zip(members, vals) if v == best]
                ties += len(win) > 1
                for q in win:
                    out[q] += r / len(win)
            else:
                tot = sum(abs(v) for v in vals)
                if tot == 0:
                    lost += r
                    continue
                for q, v in zip(members, vals):
                    out[q] += r * abs(v) / tot
    return torch.tensor(out, dtype=D).reshape(idx.shape), lost, ties


BAGS = [
    # (mode, 2d input?, padding_idx, per_sample_weights?, include_last_offset)
    ("sum", True, None, False, False),
    ("mean", True, None, False, False),
    ("max", True, None, False, False),
    ("sum", False, None, False, False),
    ("mean", False, 2, False, False),
    ("max", False, 2, False, True),
    ("sum", True, 2, True, False),
    ("sum", False, None, True, True),
    ("max", True, 2, False, False),
]


@pytest.mark.parametrize("mode,two_d,padding_idx,use_psw,last", BAGS)
def test_embedding_bag(mode: str, two_d: bool, padding_idx: int | None, use_psw: bool,
                       last: bool) -> None:
    gen = torch.Generator().manual_seed(24)
    bag = init_(nn.EmbeddingBag(6, 3, mode=mode, padding_idx=padding_idx,
                                include_last_offset=last), gen)
    if two_d:
        idx = torch.tensor([[0, 2, 4, 4], [2, 2, 2, 2], [5, 1, 3, 1]])
        offsets = None
    else:
        idx = torch.tensor([0, 2, 4, 4, 2, 2, 5, 1, 3, 1])
        offsets = torch.tensor([0, 4, 6, 6] + ([10] if last else []))  # bag 2 is empty
    psw = rand(*idx.shape, gen=gen) if use_psw else None
    model = BagNet(bag)
    inputs = {"input": idx, "offsets": offsets, "per_sample_weights": psw}
    with torch.no_grad():
        y = model(**inputs)
    seed = rand(*y.shape, gen=gen)
    scale = seed.abs().sum().item()
    ref, lost, ties = ref_bag(bag, idx, offsets, psw, seed)
    if mode == "max":
        assert ties > 0 or not two_d, "test setup: repeated tokens should tie"
    for explain_mode in ("default", "contrastive"):
        exp = dlb.explain(model, inputs, target=seed, mode=explain_mode)
        close(exp.at("bag"), ref, scale, f"EmbeddingBag({mode}) {explain_mode}")
        close(exp.inputs["input"], ref, scale, f"EmbeddingBag({mode}) model input")
        if explain_mode == "default":
            close_scalar(exp.absorbed["bag"], lost, scale, f"EmbeddingBag({mode}) lost")
        else:
            rp, _, _ = ref_bag(bag, idx, offsets, psw, seed.clamp_min(0))
            rn, _, _ = ref_bag(bag, idx, offsets, psw, (-seed).clamp_min(0))
            close(exp.positive["input"], rp, scale, "EmbeddingBag + stream")
            close(exp.negative["input"], rn, scale, "EmbeddingBag - stream")


# ---------------------------------------------------------------------------------------
# Seeds (§1)
# ---------------------------------------------------------------------------------------
def softmax_row(row: list[float]) -> list[float]:
    mx = max(row)
    e = [math.exp(v - mx) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ref_multiclass(out: Tensor, targets: list[int], m: float, contrastive: bool):
    B, C = out.shape
    pos = torch.zeros(B, C, dtype=D)
    neg = torch.zeros(B, C, dtype=D)
    for b in range(B):
        pos[b, targets[b]] = m
        p = softmax_row(out[b].tolist())
        rest = sum(p[c] for c in range(C) if c != targets[b])
        for c in range(C):
            if c != targets[b]:
                neg[b, c] = m * p[c] / rest
    return (pos, neg) if contrastive else pos


def test_seed_multiclass() -> None:
    gen = torch.Generator().manual_seed(25)
    out = rand(3, 5, gen=gen)
    am = [int(max(range(5), key=lambda c: out[b, c])) for b in range(3)]
    for target, rows in ((None, am), (2, [2, 2, 2]), ([0, 4, 1], [0, 4, 1]),
                         (torch.tensor([3, 3, 0]), [3, 3, 0])):
        for m in (100.0, 7.5):
            (got,) = make_seed(out, target, multiplier=m)
            close(got, ref_multiclass(out, rows, m, False), m, f"multiclass seed {target}")
            gp, gn = make_seed(out, target, multiplier=m, mode="contrastive")
            rp, rn = ref_multiclass(out, rows, m, True)
            close(gp, rp, m, f"contrastive R+ {target}")
            close(gn, rn, m, f"contrastive R- (softmax split) {target}")
            assert abs(float(gn.sum()) - 3 * m) < 1e-12 * 3 * m
    # a 1-D output is one row
    v = rand(5, gen=gen)
    (got,) = make_seed(v, None)
    assert got.shape == v.shape
    close(got, ref_multiclass(v[None], [int(v.argmax())], 100.0, False)[0], 100.0, "1-D seed")
    # an explicit seed tensor is used as-is
    s = rand(3, 5, gen=gen)
    assert torch.equal(make_seed(out, s)[0], s)


def test_seed_binary() -> None:
    gen = torch.Generator().manual_seed(26)
    out = rand(4, 1, gen=gen, scale=2.0)
    for target in (None, 0):
        (got,) = make_seed(out, target, task="binary", multiplier=10.0)
        close(got, torch.full((4, 1), 10.0, dtype=D), 10.0, "binary seed")
        gp, gn = make_seed(out, target, task="binary", multiplier=10.0, mode="contrastive")
        close(gp, torch.full((4, 1), 10.0, dtype=D), 10.0, "binary R+")
        ref_n = torch.tensor([[10.0 * (1 - 1 / (1 + math.exp(-float(o))))] for o in out[:, 0]],
                             dtype=D)
        close(gn, ref_n, 10.0, "binary R- = m(1-p)")
    # a 1-D output of a single-logit model: one unit per row
    o1 = out[:, 0].clone()
    gp, gn = make_seed(o1, None, task="binary", multiplier=10.0, mode="contrastive")
    close(gn, ref_n[:, 0], 10.0, "binary R- on a 1-D output")
    with pytest.raises(dlb.TargetError):
        make_seed(out, 1, task="binary")
    # two-output binary behaves like multiclass
    out2 = rand(3, 2, gen=gen)
    rows = [int(out2[b].argmax()) for b in range(3)]
    close(make_seed(out2, None, task="binary")[0], ref_multiclass(out2, rows, 100.0, False),
          100.0, "two-output binary seed")


def test_seed_regression() -> None:
    gen = torch.Generator().manual_seed(27)
    out = rand(3, 4, gen=gen)
    for target, units in ((None, [0, 1, 2, 3]), ([1, 3], [1, 3]), (2, [2])):
        (got,) = make_seed(out, target, task="regression", multiplier=50.0)
        ref = torch.zeros(3, 4, dtype=D)
        for b in range(3):
            tot = sum(abs(float(out[b, u])) for u in units)
            for u in units:
                ref[b, u] = 50.0 * abs(float(out[b, u])) / tot
        close(got, ref, 50.0, f"regression seed {target}")
    # detection is the same split
    close(make_seed(out, None, task="detection", multiplier=50.0),
          make_seed(out, None, task="regression", multiplier=50.0), 50.0, "detection seed")


def test_seed_segmentation() -> None:
    gen = torch.Generator().manual_seed(28)
    out = rand(2, 3, 4, 5, gen=gen, scale=2.0)
    for target, thr in ((1, 0.5), (0, 0.3), (None, 0.5)):
        (got,) = make_seed(out, target, task="segmentation", thresholding=thr, multiplier=20.0)
        ref = torch.zeros_like(out)
        for b in range(2):
            chosen = []
            for i, j in itertools.product(range(4), range(5)):
                p = softmax_row(out[b, :, i, j].tolist())
                c = target if target is not None else max(range(3), key=lambda k: p[k])
                if p[c] > thr:
                    chosen.append((c, i, j))
            assert chosen, "test setup: no pixel above the threshold"
            for c, i, j in chosen:
                ref[b, c, i, j] = 20.0 / len(chosen)
        close(got, ref, 20.0, f"segmentation seed {target} thr={thr}")
    # one channel: sigmoid probabilities
    o1 = rand(2, 1, 3, 3, gen=gen, scale=2.0)
    (got,) = make_seed(o1, None, task="segmentation", multiplier=20.0)
    ref = torch.zeros_like(o1)
    for b in range(2):
        on = [(i, j) for i, j in itertools.product(range(3), range(3))
              if 1 / (1 + math.exp(-float(o1[b, 0, i, j]))) > 0.5]
        for i, j in on:
            ref[b, 0, i, j] = 20.0 / len(on)
    close(got, ref, 20.0, "single-channel segmentation seed")


def test_seed_errors() -> None:
    out = torch.randn(3, 5, dtype=D)
    bad = [
        dict(target=5), dict(target=-6), dict(target=[0, 7, 1]),     # out of range
        dict(target=[0, 1]), dict(target=[0, 1, 2, 3]),              # wrong length
        dict(target=torch.zeros(3, 4, dtype=D)),                     # wrong seed shape
        dict(target=[[0], [1], [2]]),                                # wrong shape
        dict(target=0, task="clustering"),                           # unknown task
        dict(target=0, mode="sideways"),
        dict(target=[0, 9], task="regression"),
    ]
    for kw in bad:
        with pytest.raises(dlb.TargetError):
            make_seed(out, **kw)
    with pytest.raises(dlb.TargetError):
        make_seed(torch.randn(2, 3, 4, 5, dtype=D), 0)  # multiclass on a 4-D output
    with pytest.raises(dlb.TargetError):  # 3-D is a sequence: position out of range
        make_seed(torch.randn(2, 3, 4, dtype=D), 0, position=3)
    with pytest.raises(dlb.TargetError):
        make_seed(torch.randn(2, 3, 4, 4, dtype=D), 3, task="segmentation")
    with pytest.raises(dlb.TargetError):
        make_seed(torch.full((1, 2, 2, 2), 0.0, dtype=D), 0, task="segmentation")
