"""Recurrent layers (METHOD.md §3): LSTM, GRU and their cells, unrolled over time.

The fused kernel hides the gates, so the rule recomputes, from the recorded input and the
weights (read through ``ctx.param``), every gate value and state of every step, then walks
the steps backwards (one Python loop over layers, directions and time; everything else is
vectorised over batch and units).

LSTM step ``c = f⊙c' + i⊙g``, ``h = o⊙tanh(c)``: ``h``'s relevance goes half to ``o`` and
half to ``c`` (product rule, ``tanh`` passes through); ``c``'s relevance is split by the add
rule between ``f⊙c'`` and ``i⊙g``, each half to its factors. The gate pre-activations
``W_ih x + W_hh h' + b_ih + b_hh`` get the §2 rule (``rules/core.coefficients``) with the
gates' saturation bounds (sigmoid ±4 for i, f, o; tanh ±2 for g).

GRU step ``h = (1-z)⊙n + z⊙h'``: add rule between the two products, half of each to its
factors (``1-z`` to the z gate). ``n = tanh(W_in x + b_in + q)`` with ``q = r⊙(W_hn h' +
b_hn)`` is a weighted sum whose contributions are the ``W_in x`` terms and ``q`` itself
(§2, tanh bounds); ``q``'s share goes half to ``r`` and half to ``W_hn h' + b_hn`` (§2 to
``h'``, ``b_hn`` absorbed). Gates r, z: §2 with sigmoid bounds.

Contrastive mode: the weighted sums cross streams through ``rules/core``; the add and
product steps act on each stream. Relevance that reaches an implicit zero initial state (it
is zero unless something degenerate happens) is reported absorbed, as are bias shares and
guard losses, so every call conserves exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import UnsupportedModuleError
from ..records import fetch_param
from ..relevance import Streams
from .core import coefficients
from .elementwise import add_rule
from .registry import register_rule

SIGMOID = (-4.0, 4.0)
TANH = (-2.0, 2.0)


# -- streams as lists: [R] in default mode, [R+, R-] in contrastive mode ---------------------
def _split_streams(R) -> list[Tensor]:
    return [R.pos, R.neg] if isinstance(R, Streams) else [R]


def _join(parts: list[Tensor]):
    return Streams(*parts) if len(parts) == 2 else parts[0]


def _acc(total: list[Tensor], extra) -> None:
    """Add a scalar (or Streams of scalars) to a per-stream running total, in place."""
    for k, v in enumerate(_split_streams(extra)):
        total[k] = total[k] + v.to(total[k].dtype)


def _gate_bounds(spec: list[tuple[float, float]], H: int, ref: Tensor, on: bool):
    """Per-unit (lower, upper) bound tensors for gates stacked along the last axis."""
    if not on:
        return None
    lo = torch.cat([ref.new_full((H,), b[0]) for b in spec])
    hi = torch.cat([ref.new_full((H,), b[1]) for b in spec])
    return lo, hi


def _apply(coefs, a: Tensor, W: Tensor, absW: Tensor) -> list[Tensor]:
    """Per-stream relevance of input ``a`` of the units ``a @ Wᵀ``, given §2 coefficients."""
    out = []
    for c_abs, c_sgn in coefs:
        r = a.abs() * (c_abs @ absW)
        if c_sgn is not None:
            r = r + a * (c_sgn @ W)
        out.append(r)
    return out


class _Deferred:
    """§2 coefficients of the ``W_ih x_t`` part of each step, applied after the time loop."""

    def __init__(self, n_streams: int, shape, like: Tensor):
        self.c_abs = [like.new_zeros(shape) for _ in range(n_streams)]
        self.c_sgn = [like.new_zeros(shape) for _ in range(n_streams)]
        self.signed = False

    def store(self, t: int, coefs, cols: slice = slice(None)) -> None:
        for k, (c_abs, c_sgn) in enumerate(coefs):
            self.c_abs[k][t, ..., cols] = c_abs
            if c_sgn is not None:
                self.c_sgn[k][t, ..., cols] = c_sgn
                self.signed = True

    def relevance(self, X: Tensor, W: Tensor) -> list[Tensor]:
        absX, absW = X.abs(), W.abs()
        out = []
        for c_abs, c_sgn in zip(self.c_abs, self.c_sgn):
            r = absX * (c_abs @ absW)
            if self.signed:
                r = r + X * (c_sgn @ W)
            out.append(r)
        return out


@dataclass
class _Weights:
    W_ih: Tensor
    W_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None


def _weights(param, m: nn.Module, suffix: str, dt: torch.dtype) -> _Weights:
    """The weights of one layer/direction, read through ``param`` (``ctx.param``)."""
    def get(name):
        p = param(m, name + suffix)
        return None if p is None else p.to(dt)

    return _Weights(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"))


def _order(T: int, reverse: bool) -> list[int]:
    return list(range(T - 1, -1, -1)) if reverse else list(range(T))


# -- LSTM -------------------------------------------------------------------------------------
def lstm_forward(X: Tensor, h: Tensor, c: Tensor, w: _Weights, reverse: bool) -> dict:
    """Recompute one layer/direction: the gates and states of every step.

    ``X`` [T, B, in], ``h``/``c`` [B, H]. Returns a dict of [T, B, ·] tensors (``out`` is the
    hidden state of each step) plus the final ``h``/``c``.
    """
    T = X.shape[0]
    H = w.W_hh.shape[1]
    XW = X @ w.W_ih.T
    b = _bias(w.b_ih, w.b_hh)
    st = {k: X.new_empty(T, *h.shape) for k in ("h_prev", "c_prev", "i", "f", "g", "o", "c", "out")}
    for t in _order(T, reverse):
        st["h_prev"][t], st["c_prev"][t] = h, c
        z = XW[t] + h @ w.W_hh.T
        pre = z + b if b is not None else z
        i, f, o = (torch.sigmoid(p) for p in (pre[:, :H], pre[:, H:2 * H], pre[:, 3 * H:]))
        g = torch.tanh(pre[:, 2 * H:3 * H])
        c = f * c + i * g
        h = o * torch.tanh(c)
        st["i"][t], st["f"][t], st["g"][t], st["o"][t], st["c"][t], st["out"][t] = i, f, g, o, c, h
    st["h_last"], st["c_last"] = h, c
    return st


def _bias(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


def lstm_reverse(st, X, w, R_seq, R_h, R_c, reverse, saturate, absorbed):
    """Relevance of one layer/direction: returns per-stream (R_X, R_h0, R_c0).

    ``R_seq`` per stream [T, B, H] (relevance on each step's hidden output), ``R_h``/``R_c``
    per stream [B, H] (on the final states). ``absorbed`` (per stream) is added to in place.
    """
    T, H = X.shape[0], w.W_hh.shape[1]
    b = _bias(w.b_ih, w.b_hh)
    absWhh = w.W_hh.abs()
    # |contributions| and signed sums with the same operations, so that a unit whose
    # contributions all share one sign gets P or N exactly 0
    abs_total = X.abs() @ w.W_ih.abs().T + st["h_prev"].abs() @ absWhh.T
    signed = X @ w.W_ih.T + st["h_prev"] @ w.W_hh.T
    bounds = _gate_bounds([SIGMOID, SIGMOID, TANH, SIGMOID], H, X, saturate)
    n = len(R_seq)
    deferred = _Deferred(n, abs_total.shape, X)
    for t in reversed(_order(T, reverse)):
        fc = st["f"][t] * st["c_prev"][t]
        ig = st["i"][t] * st["g"][t]
        R_gates = []
        for k in range(n):
            rh = R_h[k] + R_seq[k][t]
            rc = R_c[k] + rh * 0.5  # h = o * tanh(c): half to c ...
            (r_fc, r_ig), lost = add_rule(rc, [fc, ig])
            absorbed[k] = absorbed[k] + lost
            R_c[k] = r_fc * 0.5  # f * c_prev: half to c_prev, half to f
            # gates i, f, g, o (... and half to o)
            R_gates.append(torch.cat([r_ig * 0.5, r_fc * 0.5, r_ig * 0.5, rh * 0.5], dim=-1))
        coefs, ab = coefficients(
            _join(R_gates), abs_total[t], signed[t], b, bounds=bounds
        )
        _acc(absorbed, ab)
        deferred.store(t, coefs)
        R_h = _apply(coefs, st["h_prev"][t], w.W_hh, absWhh)
    return deferred.relevance(X, w.W_ih), R_h, R_c


# -- GRU --------------------------------------------------------------------------------------
def gru_forward(X: Tensor, h: Tensor, w: _Weights, reverse: bool) -> dict:
    """Recompute one GRU layer/direction (see :func:`lstm_forward`)."""
    T = X.shape[0]
    H = w.W_hh.shape[1]
    XW = X @ w.W_ih.T
    b_rz = _bias(None if w.b_ih is None else w.b_ih[:2 * H],
                 None if w.b_hh is None else w.b_hh[:2 * H])
    b_in = None if w.b_ih is None else w.b_ih[2 * H:]
    b_hn = None if w.b_hh is None else w.b_hh[2 * H:]
    B = h.shape[0]
    st = {k: X.new_empty(T, B, H) for k in ("h_prev", "r", "z", "q", "n", "out")}
    for t in _order(T, reverse):
        st["h_prev"][t] = h
        hh = h @ w.W_hh.T
        rz = XW[t, :, :2 * H] + hh[:, :2 * H]
        rz = torch.sigmoid(rz + b_rz if b_rz is not None else rz)
        r, z = rz[:, :H], rz[:, H:]
        hn = hh[:, 2 * H:]
        q = r * (hn + b_hn if b_hn is not None else hn)
        ns = XW[t, :, 2 * H:] + q
        n = torch.tanh(ns + b_in if b_in is not None else ns)
        h = (1 - z) * n + z * h
        st["r"][t], st["z"][t], st["q"][t], st["n"][t], st["out"][t] = r, z, q, n, h
    st["h_last"] = h
    return st


def gru_reverse(st, X, w, R_seq, R_h, reverse, saturate, absorbed):
    """Relevance of one GRU layer/direction: returns per-stream (R_X, R_h0)."""
    T, H = X.shape[0], w.W_hh.shape[1]
    b_rz = _bias(None if w.b_ih is None else w.b_ih[:2 * H],
                 None if w.b_hh is None else w.b_hh[:2 * H])
    b_in = None if w.b_ih is None else w.b_ih[2 * H:]
    b_hn = None if w.b_hh is None else w.b_hh[2 * H:]
    W_hrz, W_hn = w.W_hh[:2 * H], w.W_hh[2 * H:]
    abs_hrz, abs_hn = W_hrz.abs(), W_hn.abs()
    # |contributions| and signed sums with the same operations (see lstm_reverse)
    Hp, Q = st["h_prev"], st["q"]
    absX_W, XW = X.abs() @ w.W_ih.abs().T, X @ w.W_ih.T
    abs_rz = absX_W[..., :2 * H] + Hp.abs() @ abs_hrz.T
    signed_rz = XW[..., :2 * H] + Hp @ W_hrz.T
    abs_n, signed_n = absX_W[..., 2 * H:] + Q.abs(), XW[..., 2 * H:] + Q
    abs_hn_tot, signed_hn = Hp.abs() @ abs_hn.T, Hp @ W_hn.T
    bounds_rz = _gate_bounds([SIGMOID, SIGMOID], H, X, saturate)
    bounds_n = _gate_bounds([TANH], H, X, saturate)
    n = len(R_seq)
    deferred = _Deferred(n, absX_W.shape, X)
    for t in reversed(_order(T, reverse)):
        hp, z, q = st["h_prev"][t], st["z"][t], st["q"][t]
        R_z, R_n, R_direct = [], [], []
        for k in range(n):
            rh = R_h[k] + R_seq[k][t]
            (r_a, r_b), lost = add_rule(rh, [(1 - z) * st["n"][t], z * hp])
            absorbed[k] = absorbed[k] + lost
            R_z.append((r_a + r_b) * 0.5)
            R_n.append(r_a * 0.5)
            R_direct.append(r_b * 0.5)
        coefs_n, ab = coefficients(_join(R_n), abs_n[t], signed_n[t], b_in,
                                   bounds=bounds_n)
        _acc(absorbed, ab)
        deferred.store(t, coefs_n, slice(2 * H, None))
        R_q = [c_abs * q.abs() + (c_sgn * q if c_sgn is not None else 0.0)
               for c_abs, c_sgn in coefs_n]
        coefs_hn, ab = coefficients(_join([r * 0.5 for r in R_q]), abs_hn_tot[t],
                                    signed_hn[t], b_hn)
        _acc(absorbed, ab)
        R_from_hn = _apply(coefs_hn, hp, W_hn, abs_hn)
        R_rz = [torch.cat([r * 0.5, rz], dim=-1) for r, rz in zip(R_q, R_z)]
        coefs_rz, ab = coefficients(_join(R_rz), abs_rz[t], signed_rz[t], b_rz,
                                    bounds=bounds_rz)
        _acc(absorbed, ab)
        deferred.store(t, coefs_rz, slice(None, 2 * H))
        R_from_rz = _apply(coefs_rz, hp, W_hrz, abs_hrz)
        R_h = [a + b + c for a, b, c in zip(R_direct, R_from_hn, R_from_rz)]
    return deferred.relevance(X, w.W_ih), R_h


# -- module rules ---------------------------------------------------------------------------
def _check(rec, cell: bool) -> None:
    m = rec.module
    x = rec.arguments.get("input", rec.inputs[0] if rec.inputs else None)
    if isinstance(x, PackedSequence):
        raise UnsupportedModuleError(
            f"{rec.describe()} was called with a PackedSequence; dlbhooks' recurrent rules "
            "support padded tensors only. Call the module on the padded tensor (and slice "
            "each sequence's last valid step) to explain it."
        )
    if not cell and getattr(m, "proj_size", 0):
        raise UnsupportedModuleError(
            f"{rec.describe()} has proj_size={m.proj_size}; LSTM with projections is not "
            "supported by dlbhooks' recurrent rule. Register your own rule with "
            "@dlb.register_rule(torch.nn.LSTM) or use proj_size=0."
        )
    if not cell and m.training and m.dropout > 0 and m.num_layers > 1:
        raise UnsupportedModuleError(
            f"{rec.describe()} ran in training mode with dropout={m.dropout} between layers; "
            "its random masks are not recorded. Call model.eval() before tracing."
        )
    if not rec.inputs or not isinstance(x, Tensor) or x is not rec.inputs[0]:
        raise UnsupportedModuleError(f"{rec.describe()}: the input sequence is not a tensor")


def _compute_dtype(x: Tensor, R_out) -> torch.dtype:
    """At least float32, and at least the precision of the relevance."""
    return torch.promote_types(torch.promote_types(x.dtype, torch.float32),
                               _stream_info(R_out)[1])


def _initial_states(rec, n_state: int, shape, dt) -> list[Tensor | None]:
    """The recorded initial states (``None`` where not given), converted to ``dt``."""
    states: list[Tensor | None] = [None] * n_state
    for k in range(min(n_state, len(rec.inputs) - 1)):
        states[k] = rec.input_value(1 + k).to(dt).reshape(shape)
    return states


def _stream_info(R_out) -> tuple[int, torch.dtype]:
    """Number of streams and dtype of the relevance reaching a call."""
    first = _split_streams(next(r for r in R_out if r is not None))
    return len(first), first[0].dtype


def _stream_list(R_out, i: int, shape, n: int, like: Tensor) -> list[Tensor]:
    """Relevance on output ``i`` as a per-stream list shaped ``shape`` (zeros if none)."""
    if i >= len(R_out) or R_out[i] is None:
        return [like.new_zeros(shape) for _ in range(n)]
    return [r.to(like.dtype).reshape(shape) for r in _split_streams(R_out[i])]


def unroll(m: nn.Module, X: Tensor, states: list[Tensor | None], param) -> tuple:
    """Recompute every layer and direction of an ``nn.LSTM``/``nn.GRU`` (time-major ``X``
    [T, B, in], ``states`` [L*D, B, H] or ``None`` for zeros). Returns the input of each
    layer plus the last layer's output, the per-(layer, direction) caches and weights."""
    lstm = isinstance(m, nn.LSTM)
    L, D, H = m.num_layers, 2 if m.bidirectional else 1, m.hidden_size
    zeros = X.new_zeros(L * D, X.shape[1], H)
    states = [zeros if s is None else s for s in states]
    layer_in, caches, weights = [X], [], []
    for layer in range(L):
        outs = []
        for d in range(D):
            w = _weights(param, m, f"_l{layer}" + ("_reverse" if d else ""), X.dtype)
            k = layer * D + d
            if lstm:
                st = lstm_forward(layer_in[-1], states[0][k], states[1][k], w, reverse=bool(d))
            else:
                st = gru_forward(layer_in[-1], states[0][k], w, reverse=bool(d))
            caches.append(st)
            weights.append(w)
            outs.append(st["out"])
        layer_in.append(torch.cat(outs, dim=-1))
    return layer_in, caches, weights


def recompute(m: nn.Module, x: Tensor, hx=None, param=fetch_param):
    """What ``m(x, hx)`` returns, recomputed step by step the way the rules see it (for
    checking the rules against the module; ``m`` an LSTM, GRU, LSTMCell or GRUCell)."""
    lstm = isinstance(m, (nn.LSTM, nn.LSTMCell))
    hx = [] if hx is None else [hx] if isinstance(hx, Tensor) else list(hx)
    if isinstance(m, (nn.LSTMCell, nn.GRUCell)):
        X = x.reshape(1, -1, x.shape[-1])
        B, H = X.shape[1], m.hidden_size
        states = [s.reshape(B, H) for s in hx] or [X.new_zeros(B, H)] * 2
        w = _weights(param, m, "", X.dtype)
        if lstm:
            st = lstm_forward(X, states[0], states[1], w, reverse=False)
            return st["h_last"].reshape(x.shape[:-1] + (H,)), st["c_last"].reshape(
                x.shape[:-1] + (H,))
        return gru_forward(X, states[0], w, reverse=False)["h_last"].reshape(
            x.shape[:-1] + (H,))
    batched = x.dim() == 3
    X = x.unsqueeze(1) if not batched else x.transpose(0, 1) if m.batch_first else x
    L, D, H = m.num_layers, 2 if m.bidirectional else 1, m.hidden_size
    shape = (L * D, X.shape[1], H)
    states = [s.reshape(shape) for s in hx] or [None, None]
    layer_in, caches, _ = unroll(m, X, states, param)
    out = layer_in[-1]
    out = out.squeeze(1) if not batched else out.transpose(0, 1) if m.batch_first else out
    finals = [torch.stack([st[key] for st in caches]) for key in
              (("h_last", "c_last") if lstm else ("h_last",))]
    finals = [f if batched else f.squeeze(1) for f in finals]
    return (out, tuple(finals)) if lstm else (out, finals[0])


def _rnn_rule(rec, R_out, ctx, kind: str):
    _check(rec, cell=False)
    m = rec.module
    lstm = kind == "lstm"
    x0 = rec.input_value(0)
    dt = _compute_dtype(x0, R_out)
    batched = x0.dim() == 3
    X = x0.to(dt)
    if not batched:
        X = X.unsqueeze(1)
    elif m.batch_first:
        X = X.transpose(0, 1)
    T, B = X.shape[0], X.shape[1]
    L, D, H = m.num_layers, 2 if m.bidirectional else 1, m.hidden_size
    n_state = 2 if lstm else 1
    states = _initial_states(rec, n_state, (L * D, B, H), dt)
    given = [s is not None for s in states]
    layer_in, caches, weights = unroll(m, X, states, ctx.param)

    # relevance on the outputs, per stream, time-major
    n, r_dtype = _stream_info(R_out)
    R_seq = [X.new_zeros(T, B, D * H) for _ in range(n)]
    if R_out[0] is not None:
        R_seq = [r.to(dt) for r in _split_streams(R_out[0])]
        R_seq = [r.unsqueeze(1) if not batched else r.transpose(0, 1) if m.batch_first else r
                 for r in R_seq]
    R_final = [_stream_list(R_out, 1 + j, (L * D, B, H), n, X) for j in range(n_state)]

    saturate = ctx.saturation and not ctx.contrastive
    absorbed = [X.new_zeros((), dtype=torch.float64) for _ in range(n)]
    R_init = [[X.new_zeros(L * D, B, H) for _ in range(n)] for _ in range(n_state)]
    for layer in reversed(range(L)):
        Xl = layer_in[layer]
        R_next = [Xl.new_zeros(Xl.shape) for _ in range(n)]
        for d in range(D):
            k = layer * D + d
            st, w = caches[k], weights[k]
            R_dir = [r[..., d * H:(d + 1) * H] for r in R_seq]
            R_h = [r[k] for r in R_final[0]]
            if lstm:
                R_c = [r[k] for r in R_final[1]]
                R_X, R_h0, R_c0 = lstm_reverse(st, Xl, w, R_dir, R_h, R_c, bool(d), saturate,
                                               absorbed)
                for s in range(n):
                    R_init[1][s][k] = R_c0[s]
            else:
                R_X, R_h0 = gru_reverse(st, Xl, w, R_dir, R_h, bool(d), saturate, absorbed)
            for s in range(n):
                R_init[0][s][k] = R_h0[s]
                R_next[s] = R_next[s] + R_X[s]
        R_seq = R_next

    R_in: list = [None] * len(rec.inputs)
    R_x = [r.squeeze(1) if not batched else (r.transpose(0, 1) if m.batch_first else r)
           for r in R_seq]
    R_in[0] = _join([r.to(r_dtype) for r in R_x])
    for j in range(n_state):
        if given[j]:
            shape = rec.inputs[1 + j].shape
            R_in[1 + j] = _join([r.reshape(shape).to(r_dtype) for r in R_init[j]])
        else:  # implicit zero state: normally nothing arrives; count what does as absorbed
            for s in range(n):
                absorbed[s] = absorbed[s] + R_init[j][s].double().sum()
    return R_in, _join(absorbed)


@register_rule(nn.LSTM, name="lstm")
def lstm_rule(rec, R_out, ctx):
    """Unrolled LSTM (all layers, both directions; optional ``(h0, c0)`` gets relevance)."""
    return _rnn_rule(rec, R_out, ctx, "lstm")


@register_rule(nn.GRU, name="gru")
def gru_rule(rec, R_out, ctx):
    """Unrolled GRU (all layers, both directions; optional ``h0`` gets relevance)."""
    return _rnn_rule(rec, R_out, ctx, "gru")


def _cell_rule(rec, R_out, ctx, kind: str):
    _check(rec, cell=True)
    m = rec.module
    lstm = kind == "lstm"
    x0 = rec.input_value(0)
    dt = _compute_dtype(x0, R_out)
    X = x0.to(dt).reshape(1, -1, x0.shape[-1])  # [T=1, B, in]
    B, H = X.shape[1], m.hidden_size
    n_state = 2 if lstm else 1
    states = _initial_states(rec, n_state, (B, H), dt)
    given = [s is not None for s in states]
    states = [X.new_zeros(B, H) if s is None else s for s in states]
    w = _weights(ctx.param, m, "", dt)
    n, r_dtype = _stream_info(R_out)
    R_fin = [_stream_list(R_out, j, (B, H), n, X) for j in range(n_state)]
    R_seq = [X.new_zeros(1, B, H) for _ in range(n)]
    saturate = ctx.saturation and not ctx.contrastive
    absorbed = [X.new_zeros((), dtype=torch.float64) for _ in range(n)]
    if lstm:
        st = lstm_forward(X, states[0], states[1], w, reverse=False)
        R_X, R_h0, R_c0 = lstm_reverse(st, X, w, R_seq, R_fin[0], R_fin[1], False, saturate,
                                       absorbed)
        R_init = [R_h0, R_c0]
    else:
        st = gru_forward(X, states[0], w, reverse=False)
        R_X, R_h0 = gru_reverse(st, X, w, R_seq, R_fin[0], False, saturate, absorbed)
        R_init = [R_h0]
    R_in: list = [None] * len(rec.inputs)
    R_in[0] = _join([r.reshape(x0.shape).to(r_dtype) for r in R_X])
    for j in range(n_state):
        if given[j]:
            shape = rec.inputs[1 + j].shape
            R_in[1 + j] = _join([r.reshape(shape).to(r_dtype) for r in R_init[j]])
        else:
            for s in range(n):
                absorbed[s] = absorbed[s] + R_init[j][s].double().sum()
    return R_in, _join(absorbed)


@register_rule(nn.LSTMCell, name="lstm_cell")
def lstm_cell_rule(rec, R_out, ctx):
    """One LSTM step: outputs ``(h', c')``; optional ``(h, c)`` gets relevance."""
    return _cell_rule(rec, R_out, ctx, "lstm")


@register_rule(nn.GRUCell, name="gru_cell")
def gru_cell_rule(rec, R_out, ctx):
    """One GRU step: output ``h'``; optional ``h`` gets relevance."""
    return _cell_rule(rec, R_out, ctx, "gru")
