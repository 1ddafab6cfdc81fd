"""Recurrent rules (LSTM, GRU, cells): recomputation, conservation, a slow reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_conserved
from torch import nn

import dlbhooks as dlb
from dlbhooks.engine import Engine
from dlbhooks.rules.recurrent import recompute

DT = torch.float64
SIG, TANH = (-4.0, 4.0), (-2.0, 2.0)
# agreement with the slow reference, absolute, for relevance entries of order 1 and absorbed
# totals of order 10 (measured: default mode <= 7.1e-15, contrastive mode <= 3.6e-15);
# conservation is 1e-12 of the seed in both modes (contrastive mode measured <= 4.3e-16:
# each gate unit's sides P and N are summed directly, never as (Σ|w a| ± Σ w a) / 2)
REF_ATOL = 1e-12


# -- tiny models ------------------------------------------------------------------------------
def make_rnn(kind: str, *, scale: float = 2.5, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "lstm_cell": nn.LSTMCell, "gru_cell": nn.GRUCell}[kind]
    m = cls(4, 3, **kw).to(DT).eval()
    with torch.no_grad():
        for p in m.parameters():  # large enough that gates saturate now and then
            p.mul_(scale)
    return m


class Head(nn.Module):
    """RNN -> last step of the output sequence (or h_n of the last layer) -> Linear."""

    def __init__(self, kind: str, use_hn: bool = False, **kw):
        super().__init__()
        self.rnn = make_rnn(kind, **kw)
        self.batch_first = kw.get("batch_first", False)
        d = 2 if kw.get("bidirectional", False) else 1
        self.fc = nn.Linear(3 if use_hn else 3 * d, 5).to(DT)
        self.use_hn = use_hn

    def forward(self, x, h0=None, c0=None):
        hx = None if h0 is None else h0 if c0 is None else (h0, c0)
        out, state = self.rnn(x, hx)
        if self.use_hn:
            h_n = state[0] if isinstance(state, tuple) else state
            return self.fc(h_n[-1])
        return self.fc(out[:, -1] if self.batch_first else out[-1])


def sequence(batch_first: bool, T: int = 5, B: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 4, generator=g, dtype=DT) * 1.5
    return x if batch_first else x.transpose(0, 1).contiguous()


# -- (1) recomputation ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("batch_first,bidirectional,layers,bias,with_h0,batched", [
    (True, True, 2, True, False, True),
    (False, False, 1, False, True, True),
    (False, True, 3, True, True, True),
    (True, False, 2, True, False, False),
    (False, True, 2, False, True, False),
])
def test_recompute_matches_module(kind, batch_first, bidirectional, layers, bias, with_h0,
                                  batched):
    m = make_rnn(kind, batch_first=batch_first, bidirectional=bidirectional,
                 num_layers=layers, bias=bias)
    x = sequence(batch_first)
    if not batched:
        x = x[0] if batch_first else x[:, 0]
    hx = None
    if with_h0:
        shape = (layers * (2 if bidirectional else 1),) + ((2,) if batched else ()) + (3,)
        g = torch.Generator().manual_seed(5)
        h0, c0 = torch.randn(shape, generator=g, dtype=DT), torch.randn(shape, generator=g,
                                                                         dtype=DT)
        hx = (h0, c0) if kind == "lstm" else h0
    want, got = m(x, hx), recompute(m, x, hx)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    states_w = want[1] if kind == "lstm" else (want[1],)
    states_g = got[1] if kind == "lstm" else (got[1],)
    for a, b in zip(states_g, states_w):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm_cell", "gru_cell"])
@pytest.mark.parametrize("batched", [True, False])
def test_recompute_cells(kind, batched):
    m = make_rnn(kind)
    x = torch.randn(2, 4, dtype=DT) if batched else torch.randn(4, dtype=DT)
    h = torch.randn(x.shape[:-1] + (3,), dtype=DT)
    hx = (h, torch.randn_like(h)) if kind == "lstm_cell" else h
    want, got = m(x, hx), recompute(m, x, hx)
    for a, b in zip(got if isinstance(got, tuple) else (got,),
                    want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# -- (2) conservation -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_conservation(kind, batch_first, bidirectional):
    model = Head(kind, batch_first=batch_first, bidirectional=bidirectional, num_layers=2)
    x = sequence(batch_first)
    for mode in ("default", "contrastive"):
        exp = dlb.explain(model, x, mode=mode)
        assert_conserved(exp)
        assert float(exp.inputs["x"].abs().sum()) > 1.0  # relevance did reach the input
        entry = next(e for e in exp.ledger if e.key == "rnn")
        assert entry.leaf and entry.type == type(model.rnn).__name__


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_conservation_through_final_state(kind):
    model = Head(kind, use_hn=True, bidirectional=True, num_layers=2, bias=False)
    x = sequence(False)
    for mode in ("default", "contrastive"):
        exp = dlb.explain(model, x, mode=mode)
        assert_conserved(exp)
        assert float(exp.inputs["x"].abs().sum()) > 1.0


class CellLoop(nn.Module):
    """A cell called once per step: one record per call, state routed between calls."""

    def __init__(self, kind: str):
        super().__init__()
        self.cell = make_rnn(kind)
        self.fc = nn.Linear(3, 5).to(DT)

    def forward(self, x):
        state = None
        for t in range(x.shape[0]):
            state = self.cell(x[t], state)
        return self.fc(state[0] if isinstance(state, tuple) else state)


@pytest.mark.parametrize("kind", ["lstm_cell", "gru_cell"])
def test_cell_loop_conservation(kind):
    model = CellLoop(kind)
    x = sequence(False, T=4)
    for mode in ("default", "contrastive"):
        exp = dlb.explain(model, x, mode=mode)
        assert_conserved(exp)
        assert [e.key for e in exp.ledger if e.path.startswith("cell")] == [
            "cell#3", "cell#2", "cell#1", "cell"]


# -- (3) agreement with a slow per-element reference ------------------------------------------
def ref_unit(contribs, bias, R, bounds):
    """§2 for one unit, one contribution at a time. ``R``: [R] or [R+, R-].

    Returns (relevance of each contribution, per stream) and what the unit absorbed."""
    P = sum(v for v in contribs if v > 0)
    N = sum(-v for v in contribs if v < 0)
    t = P - N + bias
    zero = [[0.0] * len(R) for _ in contribs]
    if len(R) == 1:  # default mode
        (r,) = R
        keep_p = keep_n = True
        if bounds is not None:
            keep_p = not t < bounds[0]  # below the lower bound: positives cannot move Φ
            keep_n = not t > bounds[1]  # above the upper bound: negatives cannot
        total = (P if keep_p else 0.0) + (N if keep_n else 0.0) + abs(bias)
        if total == 0:
            return zero, [r]
        shares = [[r * abs(v) / total if (v > 0 and keep_p) or (v < 0 and keep_n) else 0.0]
                  for v in contribs]
        return shares, [r * abs(bias) / total]
    rp, rn = R  # contrastive mode
    if P + N == 0:
        return zero, [rp, rn]
    if P == 0 or N == 0:
        return [[rp * abs(v) / (P + N), rn * abs(v) / (P + N)] for v in contribs], [0.0, 0.0]
    aligned = (t > 0 and rp > rn) or (t <= 0 and rp <= rn)
    shares = []
    for v in contribs:
        if v > 0:
            shares.append([rp * v / P, 0.0] if aligned else [0.0, rn * v / P])
        elif v < 0:
            shares.append([0.0, rn * -v / N] if aligned else [rp * -v / N, 0.0])
        else:
            shares.append([0.0, 0.0])
    return shares, [0.0, 0.0]


def ref_add(R, terms):
    """Add rule: share ∝ |term|, per stream; everything lost if all terms vanish."""
    total = sum(abs(a) for a in terms)
    if total == 0:
        return [[0.0] * len(R) for _ in terms], list(R)
    return [[r * abs(a) / total for r in R] for a in terms], [0.0] * len(R)


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def ref_weights(m, cell):
    L = 1 if cell else m.num_layers
    D = 2 if not cell and m.bidirectional else 1
    G = 4 if isinstance(m, (nn.LSTM, nn.LSTMCell)) else 3
    out = {}
    for l in range(L):
        for d in range(D):
            suf = "" if cell else f"_l{l}" + ("_reverse" if d else "")
            ws = []
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                p = getattr(m, name + suf, None)
                ws.append(np.zeros(G * m.hidden_size) if p is None
                          else p.detach().numpy().copy())
            out[l, d] = ws
    return out, L, D


def ref_rnn(m, X, states, R_seq, R_fin, S, saturation):
    """Slow LSTM/GRU relevance: loops over layers, directions, batch rows, steps, units and
    inputs. ``X`` [T, B, in] time-major; ``states``: list of [L*D, B, H] arrays or None;
    ``R_seq`` [S, T, B, D*H]; ``R_fin``: per state [S, L*D, B, H]. Returns
    (R_x [S, T, B, in], relevance of each initial state [S, L*D, B, H], absorbed [S])."""
    lstm = isinstance(m, (nn.LSTM, nn.LSTMCell))
    W, L, D = ref_weights(m, cell=isinstance(m, (nn.LSTMCell, nn.GRUCell)))
    H = m.hidden_size
    T, B = X.shape[:2]
    n_state = 2 if lstm else 1
    states = [np.zeros((L * D, B, H)) if s is None else s for s in states]
    inputs = [X]
    cache = {}
    for l in range(L):  # forward, element by element
        out = np.zeros((T, B, D * H))
        for d in range(D):
            Wih, Whh, bih, bhh = W[l, d]
            n_in = Wih.shape[1]
            for b in range(B):
                h = states[0][l * D + d, b].copy()
                c = states[1][l * D + d, b].copy() if lstm else None
                for t in (range(T) if d == 0 else reversed(range(T))):
                    x = inputs[l][t, b]
                    wx = [sum(Wih[j, i] * x[i] for i in range(n_in)) for j in range(len(bih))]
                    wh = [sum(Whh[j, k] * h[k] for k in range(H)) for j in range(len(bih))]
                    e = {"x": x.copy(), "h": h.copy()}
                    if lstm:
                        pre = [wx[j] + wh[j] + bih[j] + bhh[j] for j in range(4 * H)]
                        i_ = [sigmoid(pre[k]) for k in range(H)]
                        f_ = [sigmoid(pre[H + k]) for k in range(H)]
                        g_ = [np.tanh(pre[2 * H + k]) for k in range(H)]
                        o_ = [sigmoid(pre[3 * H + k]) for k in range(H)]
                        e.update(c=c.copy(), i=i_, f=f_, g=g_)
                        c = np.array([f_[k] * c[k] + i_[k] * g_[k] for k in range(H)])
                        h = np.array([o_[k] * np.tanh(c[k]) for k in range(H)])
                    else:
                        r_ = [sigmoid(wx[k] + wh[k] + bih[k] + bhh[k]) for k in range(H)]
                        z_ = [sigmoid(wx[H + k] + wh[H + k] + bih[H + k] + bhh[H + k])
                              for k in range(H)]
                        q_ = [r_[k] * (wh[2 * H + k] + bhh[2 * H + k]) for k in range(H)]
                        n_ = [np.tanh(wx[2 * H + k] + bih[2 * H + k] + q_[k]) for k in range(H)]
                        e.update(z=z_, q=q_, n=n_)
                        h = np.array([(1 - z_[k]) * n_[k] + z_[k] * h[k] for k in range(H)])
                    cache[l, d, b, t] = e
                    out[t, b, d * H:(d + 1) * H] = h
        inputs.append(out)

    absorbed = np.zeros(S)
    R_init = [np.zeros((S, L * D, B, H)) for _ in range(n_state)]
    R_out_l = R_seq.copy()
    for l in reversed(range(L)):  # reverse pass
        R_in_l = np.zeros((S, T, B, inputs[l].shape[2]))
        for d in range(D):
            Wih, Whh, bih, bhh = W[l, d]
            n_in = Wih.shape[1]
            for b in range(B):
                rh = R_fin[0][:, l * D + d, b].copy()
                rc = R_fin[1][:, l * D + d, b].copy() if lstm else None
                for t in (reversed(range(T)) if d == 0 else range(T)):
                    e = cache[l, d, b, t]
                    x, hp = e["x"], e["h"]
                    rh = rh + R_out_l[:, t, b, d * H:(d + 1) * H]
                    new_rh = np.zeros((S, H))
                    if lstm:
                        Rg = np.zeros((S, 4 * H))
                        new_rc = np.zeros((S, H))
                        for k in range(H):
                            Rg[:, 3 * H + k] = rh[:, k] / 2  # h = o * tanh(c): half to o
                            rc_k = rc[:, k] + rh[:, k] / 2  # ... half to c
                            (s_fc, s_ig), lost = ref_add(
                                rc_k, [e["f"][k] * e["c"][k], e["i"][k] * e["g"][k]])
                            absorbed += lost
                            for s in range(S):
                                new_rc[s, k] = s_fc[s] / 2
                                Rg[s, H + k] = s_fc[s] / 2
                                Rg[s, k] = s_ig[s] / 2
                                Rg[s, 2 * H + k] = s_ig[s] / 2
                        for j in range(4 * H):
                            contribs = ([Wih[j, i] * x[i] for i in range(n_in)]
                                        + [Whh[j, k] * hp[k] for k in range(H)])
                            bounds = (TANH if j // H == 2 else SIG) if saturation else None
                            shares, ab = ref_unit(contribs, bih[j] + bhh[j], Rg[:, j], bounds)
                            absorbed += ab
                            for i in range(n_in):
                                R_in_l[:, t, b, i] += shares[i]
                            for k in range(H):
                                new_rh[:, k] += shares[n_in + k]
                        rc = new_rc
                    else:
                        Rrz = np.zeros((S, 2 * H))
                        for k in range(H):
                            (s_a, s_b), lost = ref_add(
                                rh[:, k], [(1 - e["z"][k]) * e["n"][k], e["z"][k] * hp[k]])
                            absorbed += lost
                            for s in range(S):
                                Rrz[s, H + k] = s_a[s] / 2 + s_b[s] / 2  # (1-z) and z
                                new_rh[s, k] += s_b[s] / 2
                            # n: contributions W_in x and q; bias b_in
                            contribs = ([Wih[2 * H + k, i] * x[i] for i in range(n_in)]
                                        + [e["q"][k]])
                            shares, ab = ref_unit(contribs, bih[2 * H + k],
                                                  [v / 2 for v in s_a],
                                                  TANH if saturation else None)
                            absorbed += ab
                            for i in range(n_in):
                                R_in_l[:, t, b, i] += shares[i]
                            R_q = shares[n_in]
                            for s in range(S):
                                Rrz[s, k] = R_q[s] / 2  # half to r
                            # the other half to W_hn h + b_hn (no activation: no bounds)
                            contribs = [Whh[2 * H + k, mm] * hp[mm] for mm in range(H)]
                            shares, ab = ref_unit(contribs, bhh[2 * H + k],
                                                  [v / 2 for v in R_q], None)
                            absorbed += ab
                            for mm in range(H):
                                new_rh[:, mm] += shares[mm]
                        for j in range(2 * H):
                            contribs = ([Wih[j, i] * x[i] for i in range(n_in)]
                                        + [Whh[j, k] * hp[k] for k in range(H)])
                            shares, ab = ref_unit(contribs, bih[j] + bhh[j], Rrz[:, j],
                                                  SIG if saturation else None)
                            absorbed += ab
                            for i in range(n_in):
                                R_in_l[:, t, b, i] += shares[i]
                            for k in range(H):
                                new_rh[:, k] += shares[n_in + k]
                    rh = new_rh
                R_init[0][:, l * D + d, b] = rh
                if lstm:
                    R_init[1][:, l * D + d, b] = rc
        R_out_l = R_in_l
    return R_out_l, R_init, absorbed


def _streams(R, S):
    assert R.shape[0] == S  # stacked: [S, ...]
    return list(R.unbind(0))


def _random_rel(shape, S, g):
    if S == 1:  # default mode relevance may carry either sign
        return torch.randn(shape, generator=g, dtype=DT)[None] * 3
    return torch.stack((torch.rand(shape, generator=g, dtype=DT) * 3,
                        torch.rand(shape, generator=g, dtype=DT) * 3))


def run_rule(m, args, mode, saturation, seed=3):
    """Trace ``m`` alone, put random relevance on every output and run its rule."""
    with dlb.trace(m) as tape:
        m(*args)
    rec = tape.roots[-1]
    g = torch.Generator().manual_seed(seed)
    S = 2 if mode == "contrastive" else 1
    R_out = [_random_rel(o.shape, S, g) for o in rec.outputs]
    engine = Engine(tape, mode=mode, saturation=saturation)
    R_in = engine.propagate(rec, R_out)
    return rec, R_out, R_in, tuple(engine.ledger[0].absorbed.tolist())


MODES = [("default", True), ("default", False), ("contrastive", True)]
CONFIGS = [
    dict(num_layers=2, bidirectional=True, batch_first=True, h0=True),
    dict(num_layers=2, bidirectional=True, batch_first=False, h0=False, bias=False),
    dict(num_layers=1, bidirectional=False, batch_first=False, h0=True, bias=False),
]


def assert_call_conserved(R_out, R_in, absorbed, S):
    """One call's ledger, per stream: Σ R_out = Σ R_in + absorbed, to 1e-12 of Σ R_out."""
    absorbed = absorbed if isinstance(absorbed, tuple) else (absorbed,)
    for s in range(S):
        out = sum(float(_streams(r, S)[s].sum()) for r in R_out)
        inn = sum(float(_streams(r, S)[s].sum()) for r in R_in if r is not None)
        assert abs(out - inn - absorbed[s]) <= 1e-12 * abs(out), (s, out, inn, absorbed[s])


def check_module(m, x, states, with_h0, mode, saturation):
    """An LSTM/GRU's rule on ``x`` (``states``: [L*D, B, H] each, passed if ``with_h0``)
    with random relevance on every output, against :func:`ref_rnn`, and its ledger."""
    bf = m.batch_first
    n_state = len(states)
    args = (x,) if not with_h0 else (x, tuple(states) if n_state == 2 else states[0])
    rec, R_out, R_in, absorbed = run_rule(m, args, mode, saturation)
    S = 2 if mode == "contrastive" else 1
    tol = REF_ATOL
    assert_call_conserved(R_out, R_in, absorbed, S)

    X = (x.transpose(0, 1) if bf else x).numpy()
    R_seq = np.stack([(r.transpose(0, 1) if bf else r).numpy()
                      for r in _streams(R_out[0], S)])
    R_fin = [np.stack([r.numpy() for r in _streams(R_out[1 + j], S)]) for j in range(n_state)]
    ref_x, ref_init, ref_abs = ref_rnn(
        m, X, [s.numpy() for s in states] if with_h0 else [None] * n_state, R_seq, R_fin, S,
        saturation and mode == "default",
    )
    if not with_h0:  # relevance reaching the implicit zero state counts as absorbed
        ref_abs = ref_abs + sum(r.sum(axis=(1, 2, 3)) for r in ref_init)
    for s, got in enumerate(_streams(R_in[0], S)):
        want = torch.from_numpy(ref_x[s])
        torch.testing.assert_close(got, want.transpose(0, 1) if bf else want, rtol=0, atol=tol)
    if with_h0:
        assert len(R_in) == 1 + n_state
        for j in range(n_state):
            for s, got in enumerate(_streams(R_in[1 + j], S)):
                torch.testing.assert_close(got, torch.from_numpy(ref_init[j][s]), rtol=0,
                                           atol=tol)
                assert float(got.abs().sum()) > 0
    absorbed = absorbed if isinstance(absorbed, tuple) else (absorbed,)
    np.testing.assert_allclose(absorbed, ref_abs, rtol=0, atol=tol)


def check_cell(m, x, states, mode, saturation):
    """A cell's rule on ``x`` [B, in] and its ``states``, as :func:`check_module`."""
    n_state = len(states)
    args = (x, tuple(states) if n_state == 2 else states[0])
    rec, R_out, R_in, absorbed = run_rule(m, args, mode, saturation)
    S = 2 if mode == "contrastive" else 1
    tol = REF_ATOL
    assert_call_conserved(R_out, R_in, absorbed, S)
    R_fin = [np.stack([r.numpy()[None] for r in _streams(R_out[j], S)]) for j in range(n_state)]
    ref_x, ref_init, ref_abs = ref_rnn(
        m, x.numpy()[None], [s.numpy()[None] for s in states],
        np.zeros((S, 1) + tuple(states[0].shape)), R_fin, S, saturation and mode == "default",
    )
    for s, got in enumerate(_streams(R_in[0], S)):
        torch.testing.assert_close(got, torch.from_numpy(ref_x[s, 0]), rtol=0, atol=tol)
    for j in range(n_state):
        for s, got in enumerate(_streams(R_in[1 + j], S)):
            torch.testing.assert_close(got, torch.from_numpy(ref_init[j][s, 0]), rtol=0,
                                       atol=tol)
    absorbed = absorbed if isinstance(absorbed, tuple) else (absorbed,)
    np.testing.assert_allclose(absorbed, ref_abs, rtol=0, atol=tol)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("mode,saturation", MODES)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)))
def test_matches_reference(kind, mode, saturation, cfg):
    cfg = dict(CONFIGS[cfg])
    with_h0 = cfg.pop("h0")
    m = make_rnn(kind, **cfg)
    x = sequence(cfg["batch_first"])
    L, D, H = m.num_layers, 2 if m.bidirectional else 1, 3
    n_state = 2 if kind == "lstm" else 1
    g = torch.Generator().manual_seed(7)
    states = [torch.randn(L * D, 2, H, generator=g, dtype=DT) for _ in range(n_state)]
    check_module(m, x, states, with_h0, mode, saturation)


@pytest.mark.parametrize("kind", ["lstm_cell", "gru_cell"])
@pytest.mark.parametrize("mode,saturation", MODES)
def test_cells_match_reference(kind, mode, saturation):
    m = make_rnn(kind)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, generator=g, dtype=DT) * 1.5
    n_state = 2 if kind == "lstm_cell" else 1
    states = [torch.randn(2, 3, generator=g, dtype=DT) for _ in range(n_state)]
    check_cell(m, x, states, mode, saturation)


def tiny_sides(m: nn.Module) -> None:
    """Give the first unit of every gate, for a positive input, a negative side 1e-13 of its
    positive one: input weights (1, -1e-13, 0.5, 0.25), none from the hidden state (and
    for GRU's n gate no ``b_hn`` either, so that its contribution ``q`` is 0)."""
    H = m.hidden_size
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("weight_ih"):
                p[::H] = torch.tensor([1.0, -1e-13, 0.5, 0.25], dtype=p.dtype)
            elif name.startswith("weight_hh"):
                p[::H] = 0.0
            elif name.startswith("bias_hh") and isinstance(m, (nn.GRU, nn.GRUCell)):
                p[2 * H] = 0.0


@pytest.mark.parametrize("kind", ["lstm", "gru", "lstm_cell", "gru_cell"])
def test_contrastive_tiny_side(kind):
    """Gate units with a side 1e-13 of the other: contrastive mode sums each unit's P and N
    directly, so every stream is conserved and matches the slow reference to 1e-12. (From
    (Σ|w a| ± Σ w a) / 2, 1/N was off by ~eps (P + N) / N: the calls leaked up to 1.8e-4 of
    their relevance and differed from the reference by up to 9.9e-3; now <= 2.3e-16 and
    <= 2.7e-15.)"""
    m = make_rnn(kind, **({} if kind.endswith("cell") else {"bidirectional": True}))
    tiny_sides(m)
    g = torch.Generator().manual_seed(4)
    n_state = 2 if kind.startswith("lstm") else 1
    if kind.endswith("cell"):
        x = torch.rand(2, 4, generator=g, dtype=DT) + 0.1
        states = [torch.randn(2, 3, generator=g, dtype=DT) for _ in range(n_state)]
        check_cell(m, x, states, "contrastive", False)
    else:
        x = sequence(False).abs_() + 0.1
        states = [torch.randn(2, 2, 3, generator=g, dtype=DT) for _ in range(n_state)]
        check_module(m, x, states, True, "contrastive", False)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_saturation_fires(kind):
    """The reference comparison with saturation on is not vacuous: it changes the result."""
    m = make_rnn(kind, num_layers=2, bidirectional=True)
    x = sequence(False)
    on = run_rule(m, (x,), "default", True)[2][0]
    off = run_rule(m, (x,), "default", False)[2][0]
    assert float((on - off).abs().max()) > 1e-3


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_float32_matches_float64(kind):
    """The float32 path (fused-kernel states, the recorded output reused) agrees with the
    float64 one."""
    x = sequence(False, T=6)
    runs = []
    for dt in (torch.float32, DT):
        m = make_rnn(kind, num_layers=2, bidirectional=True, scale=1.5).to(dt)
        with dlb.trace(m) as tape:
            m(x.to(dt))
        rec = tape.roots[-1]
        g = torch.Generator().manual_seed(3)
        R_out = [(torch.randn(o.shape, generator=g, dtype=DT) * 3).to(dt)[None]
                 for o in rec.outputs]
        engine = Engine(tape, mode="default", saturation=True)
        runs.append((engine.propagate(rec, R_out)[0][0], engine.ledger[0].absorbed[0]))
    (got, got_abs), (want, want_abs) = runs
    assert got.dtype == torch.float32
    # float32 rounding (of the relevance put on the outputs too): measured 3.1e-7 of entries
    # up to 2.9, and 8.1e-7 of an absorbed total of 15.7
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1.5e-6)
    assert abs(got_abs - want_abs) <= 2.5e-7 * (abs(want_abs) + 1)


# -- (4) initial states as inputs -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_initial_state_receives_relevance(kind):
    model = Head(kind, num_layers=2, bidirectional=True, batch_first=True)
    x = sequence(True, T=4)
    g = torch.Generator().manual_seed(11)
    h0 = torch.randn(4, 2, 3, generator=g, dtype=DT) * 2
    c0 = torch.randn(4, 2, 3, generator=g, dtype=DT) * 2 if kind == "lstm" else None
    args = (x, h0, c0) if kind == "lstm" else (x, h0)
    for mode in ("default", "contrastive"):
        exp = dlb.explain(model, args, mode=mode)
        assert_conserved(exp)
        names = ["h0", "c0"] if kind == "lstm" else ["h0"]
        for name in names:
            R = exp.inputs[name]
            assert R.shape == h0.shape
            if mode == "default":
                assert float(R.abs().sum()) > 1e-3, name
            else:
                pos, neg = exp.positive[name], exp.negative[name]
                assert float(pos.sum() + neg.sum()) > 1e-3, name


def test_unbatched_input_conserves():
    model = Head("lstm", num_layers=2, bidirectional=True)
    x = sequence(False)[:, 0]  # [T, in]
    for mode in ("default", "contrastive"):
        exp = dlb.explain(model, x, target=1, mode=mode)
        assert_conserved(exp)
        assert exp.inputs["x"].shape == x.shape


# -- (5) clear errors -------------------------------------------------------------------------
def test_proj_size_is_unsupported():
    model = Head("lstm", proj_size=2)
    model.fc = nn.Linear(2, 5).to(DT)
    with pytest.raises(dlb.UnsupportedModuleError, match=r"'rnn'.*proj_size=2"):
        dlb.explain(model, sequence(False))


def test_packed_sequence_is_unsupported():
    m = make_rnn("gru")
    packed = nn.utils.rnn.pack_padded_sequence(sequence(False), [5, 3])
    with dlb.trace(m) as tape:
        m(packed)
    rec = tape.roots[-1]
    R_out = [torch.zeros_like(o)[None] if o.is_floating_point() else None for o in rec.outputs]
    R_out[0] = torch.ones_like(rec.outputs[0])[None]
    with pytest.raises(dlb.UnsupportedModuleError, match="PackedSequence"):
        Engine(tape).propagate(rec, R_out)
