"""Recurrent layers (METHOD.md §3): LSTM, GRU and their cells, unrolled over time.

The fused kernel hides the gates, so the rule recomputes them from the recorded input and
the weights (read through ``ctx.param``): the hidden-state sequence of every layer comes
from the fused kernel itself (``torch._VF.lstm``/``gru``, one layer at a time; the top
layer's is the recorded output), then every gate of every step is one matrix product per
layer and direction (the LSTM cell state is a cheap element-wise recurrence). The reverse
pass walks the steps backwards in one Python loop per layer and direction; everything that
does not depend on the relevance flowing back is computed for all steps at once before it,
and the ``W_ih x`` part of every step is one matrix product after it.

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

In default mode every split above is linear in the relevance (the §2 denominators and
saturation masks depend on the forward values only), so the reverse loop multiplies by
per-unit factors precomputed for all steps: the add-rule fractions and the §2
coefficients that ``add_rule``/``coefficients`` give for unit relevance. What a unit
keeps (bias share, guard) is then, per unit of relevance, one minus what its
contributions receive from those coefficients (:func:`_kept`), summed against the
relevance of every step after the loop. Contrastive mode is not linear in the relevance
(which side is "aligned" depends on it), so there the per-unit split
(``rules/core.contrastive_side_coefficients``) runs once per step; the add and product
steps act on each stream. Its per-unit sides P and N are summed directly for all steps
(the sign parts of ``x`` and ``h'`` against ``W⁺``, ``W⁻``) and relevance goes back
through the same non-negative products: from ``Σ|w a| ± Σ w a`` a small side would carry
``eps (P + N)`` and its stream would leak up to 1/64 of that unit's relevance. This costs
about twice the products of a signed/absolute pair (``[cp | cn] @ [[W⁺ W⁻]; [W⁻ W⁺]]``).

Relevance that reaches an implicit zero initial state (it is zero unless something
degenerate happens) is reported absorbed, as are bias shares and guard losses, so every
call conserves to float precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import UnsupportedModuleError
from ..relevance import stack, streams_of
from ..weights import fetch_param
from .contract import RuleContext, RuleResult, per_target
from .core import _sign_parts, coefficients, contrastive_side_coefficients, contrastive_split
from .elementwise import add_rule
from .registry import register_rule

if TYPE_CHECKING:
    from ..records import Record

SIGMOID = (-4.0, 4.0)
TANH = (-2.0, 2.0)


# -- streams as lists: [R] in default mode, [R+, R-] in contrastive mode ---------------------
def _acc(total: list[Tensor], extra) -> None:
    """Add per-stream totals (``[S]``) to a per-stream running total, in place."""
    for k, v in enumerate(streams_of(extra)):
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
            r.add_(a * (c_sgn @ W))  # (no fused multiply-add: cancellations stay exact)
        out.append(r)
    return out


def _mm2(A: Tensor, W1: Tensor, Bm: Tensor, W2: Tensor) -> Tensor:
    """``A @ W1ᵀ + Bm @ W2ᵀ`` for [T, B, ·] operands (the second product accumulates)."""
    lead = A.shape[:-1]
    out = A.reshape(-1, A.shape[-1]) @ W1.T
    return out.addmm_(Bm.reshape(-1, Bm.shape[-1]), W2.T).view(*lead, -1)


def _mm(A: Tensor, W: Tensor) -> Tensor:
    """``A @ Wᵀ`` for a [T, B, ·] operand."""
    return (A.reshape(-1, A.shape[-1]) @ W.T).view(*A.shape[:-1], -1)


# -- contrastive mode: each unit's positive and negative sides, summed directly ---------------
def _signed_parts(a: Tensor, W: Tensor) -> tuple[Tensor, Tensor, int]:
    """The units ``a @ Wᵀ`` as products of non-negative factors (``rules/core._sign_parts``):
    ``(A, M, k)`` with ``A = [a⁺ | a⁻]`` (``a`` alone, ``k = 1``, when it has no negative
    entry) and ``M = [[W⁺, W⁻], [W⁻, W⁺]]`` (shape [2 U, k I]: its first block column
    only when ``k = 1``), so that ``A @ Mᵀ = [P | N]`` of every unit and ``[cp | cn] @ M``
    is what each part of ``a`` receives per unit of |contribution| (:func:`_receive`)."""
    parts = _sign_parts(a, W, False)
    A = parts[0][0] if len(parts) == 1 else torch.cat([ax for ax, _, _ in parts], dim=-1)
    M = torch.cat([torch.cat([wp, wn]) for _, wp, wn in parts], dim=1)
    return A, M, len(parts)


def _side_coefs(G: Tensor, split, out: Tensor, absorbed: list[Tensor]) -> None:
    """Contrastive §2 split of the units' relevance ``G`` [2, B, U] (the streams stacked)
    into ``out`` [2, B, 2, U]: per stream, the coefficients ``(cp, cn)`` that positive and
    negative contributions receive per unit of |contribution|. Adds what units without
    contributions lose to ``absorbed``."""
    pairs, ab = contrastive_side_coefficients(G, split)
    if split.lost is not None:  # (else nothing is lost)
        _acc(absorbed, ab)
    for k, (cp, cn) in enumerate(pairs):
        torch.stack((cp, cn), dim=-2, out=out[k])


def _receive(c: Tensor, M: Tensor, A: Tensor, k: int) -> Tensor:
    """Relevance of the inputs of units given their coefficients ``c`` [..., 2, U]
    (``(cp, cn)``), with ``(A, M, k)`` of :func:`_signed_parts` (``A`` broadcastable to
    the result): ``Σ_parts a_part ⊙ (cp W_P + cn W_N)``, non-negative terms only."""
    g = (c.flatten(-2) @ M).mul_(A)
    if k == 1:
        return g
    n = g.shape[-1] // 2
    return g[..., :n].add_(g[..., n:])


@dataclass
class _Weights:
    W_ih: Tensor
    W_hh: Tensor
    b_ih: Tensor | None
    b_hh: Tensor | None

    @cached_property
    def abs_ih(self) -> Tensor:
        return self.W_ih.abs()

    @cached_property
    def abs_hh(self) -> Tensor:  # (one |W_hh| per call: the sums and the walk share it)
        return self.W_hh.abs()


def _weights(param, m: nn.Module, suffix: str, dt: torch.dtype) -> _Weights:
    """The weights of one layer/direction, read through ``param`` (``ctx.param``)."""
    def get(name):
        p = param(m, name + suffix)
        return None if p is None else p.to(dt)

    return _Weights(get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"))


def _order(T: int, reverse: bool) -> list[int]:
    return list(range(T - 1, -1, -1)) if reverse else list(range(T))


def _shift(seq: Tensor, first: Tensor, reverse: bool) -> Tensor:
    """The previous state of every step: ``first`` at the first step of the recurrence."""
    if reverse:
        return torch.cat([seq[1:], first.unsqueeze(0)])
    return torch.cat([first.unsqueeze(0), seq[:-1]])


def _bias(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    if b_ih is None:
        return b_hh
    return b_ih if b_hh is None else b_ih + b_hh


def _last(T: int, reverse: bool) -> int:
    """Index of the last step of the recurrence (where the reverse walk starts)."""
    return 0 if reverse else T - 1


# -- LSTM -------------------------------------------------------------------------------------
def lstm_steps(X: Tensor, Hp: Tensor, c0: Tensor, w: _Weights, reverse: bool, *,
               keep_signed: bool = True, keep_o: bool = False) -> dict:
    """Gates and cell states of every step of one layer/direction, given the input ``X``
    [T, B, in] and the previous hidden state of every step ``Hp`` [T, B, H]. Keeps what
    the reverse pass needs (``signed``, the sums ``W_ih x + W_hh h'``, only if asked)."""
    T = X.shape[0]
    H = w.W_hh.shape[1]
    signed = _mm2(X, w.W_ih, Hp, w.W_hh)  # W_ih x + W_hh h' of every step
    b = _bias(w.b_ih, w.b_hh)
    if keep_signed:
        gates = signed + b if b is not None else signed.clone()  # pre-activations ...
    else:
        gates, signed = (signed.add_(b) if b is not None else signed), None
    g = torch.tanh(gates[..., 2 * H:3 * H])
    gates.sigmoid_()[..., 2 * H:3 * H] = g  # ... to the gates i, f, g, o, in place
    i, f, g, o = gates.chunk(4, dim=-1)
    ig = i * g
    C = torch.zeros_like(ig)  # (touched in one pass: no page faults inside the loop)
    c = c0
    igs, fs, Cs = ig.unbind(0), f.unbind(0), C.unbind(0)
    for t in _order(T, reverse):  # c = f c' + i g, element-wise
        c = torch.addcmul(igs[t], fs[t], c, out=Cs[t])
    fc = torch.empty_like(ig)  # f c' of every step
    prev, cur = (slice(1, None), slice(None, -1)) if reverse else (slice(None, -1),
                                                                    slice(1, None))
    torch.mul(f[cur], C[prev], out=fc[cur])
    start = _last(T, not reverse)
    torch.mul(f[start], c0, out=fc[start])
    st = {"X": X, "Hp": Hp, "C": C, "fc": fc, "ig": ig, "signed": signed}
    if keep_o:
        st["o"] = o
    return st


def lstm_reverse(st, w, R_seq, R_h, R_c, reverse, saturate, absorbed):
    """Relevance of one layer/direction: returns per-stream (R_X, R_h0, R_c0).

    ``R_seq`` per stream [T, B, H] (relevance on each step's hidden output), ``R_h``/``R_c``
    per stream [B, H] (on the final states). ``absorbed`` (per stream) is added to in place.
    """
    X, Hp = st["X"], st["Hp"]
    T, B = X.shape[:2]
    H = w.W_hh.shape[1]
    b = _bias(w.b_ih, w.b_hh)
    terms = [st["fc"], st["ig"]]  # c = f c' + i g
    n = len(R_seq)
    order = _order(T, not reverse)  # against the recurrence
    if n > 1:
        (a_fc, a_ig), _ = add_rule(X.new_ones(()), terms)  # split of unit relevance
        RC = X.new_zeros(n, T, B, H)  # relevance on c_t (touched: no page faults in the loop)
        R_X, R_h, R_c = _lstm_loop_streams(st, w, R_seq, R_h, R_c, RC, order, a_fc, a_ig, b,
                                           absorbed)
        for k in range(n):  # the add rule's guard losses, all steps at once
            absorbed[k] = absorbed[k] + add_rule(RC[k], terms)[1]
        return R_X, R_h, R_c
    absW_ih = w.abs_ih
    absHp = Hp.abs()
    # |contributions| with the same operations as the signed sums, so that a unit whose
    # contributions all share one sign gets P or N exactly 0 (made where used and
    # dropped as soon as possible: big temporaries are what costs here)
    abs_total = _mm2(X.abs(), absW_ih, absHp, w.abs_hh)
    bounds = _gate_bounds([SIGMOID, SIGMOID, TANH, SIGMOID], H, X, saturate)
    (a_fc, a_ig), add_lost = add_rule(X.new_ones(()), terms)  # split of unit relevance
    coefs, R_h, R_c, kept = _lstm_loop(st, w, R_seq[0], R_h[0], R_c[0], order, a_fc, a_ig,
                                       abs_total, b, bounds, absHp,
                                       add_guard=bool(add_lost != 0))
    absorbed[0] = absorbed[0] + kept
    return _apply(coefs, X, w.W_ih, absW_ih), R_h, R_c


def _kept(K: Tensor, K_sgn: Tensor | None, abs_total: Tensor, signed: Tensor | None,
          out: Tensor | None = None) -> Tensor:
    """Per unit, the part of unit relevance that its contributions do not receive given
    the §2 coefficients ``(K, K_sgn)`` of unit relevance (what the bias and the guard keep):
    contribution i receives ``K |w a_i| + K_sgn w a_i``, which sum to
    ``K abs_total + K_sgn signed_total``. ``out`` may be ``abs_total`` itself."""
    kept = torch.addcmul(K.new_ones(()), K, abs_total, value=-1.0, out=out)
    if K_sgn is not None:
        kept.addcmul_(K_sgn, signed, value=-1.0)
    return kept


# The setup writes the per-step factors into buffers that the sequential loop over time
# steps then overwrites in place (views of a few [T, B, 4H] tensors: no fresh memory, hence
# no page faults, inside the loop). Split, the pieces would hand a dozen aliased views to
# each other, and a helper per step would cost a Python call per step.
# long: the hottest loop of the recurrent rules, in place on the buffers its setup fills
def _lstm_loop(st, w, R_seq, R_h, R_c, order, a_fc, a_ig, abs_total, b, bounds, absHp,
               add_guard: bool = True):
    """Default mode: the reverse walk as a linear recurrence with precomputed factors.

    Returns the §2 coefficients of every step ([(c_abs, c_sgn)], [T, B, 4H]), the relevance
    of the initial h and c, and what the biases and guards absorbed. ``add_guard``: some
    ``c = f c' + i g`` has both terms 0 (the add rule's guard)."""
    T, B, H = a_fc.shape
    # The gates' relevances are (rc a_ig, rc a_fc, rc a_ig, rh) / 2 for the relevance rh on
    # h and rc on c; their coefficients are those times the coefficients K of unit
    # relevance. With u = rh / 2 (halving is exact): c_i,f,g = rc M, c_o = u M.
    babs = None if b is None else b.abs()
    plain = not add_guard and bounds is None and babs is not None and bool(babs.amin() > 0)
    if plain:
        # no saturation and no guard anywhere: K = 1 / (|W| |a| + |b|), and a unit keeps
        # exactly its bias share, c_abs |b| (summed over the coefficients after the walk)
        K, K_sgn = abs_total.add_(babs).reciprocal_(), None
    else:
        (K, K_sgn), = coefficients(a_fc.new_ones(()), abs_total, st["signed"], b,
                                   bounds=bounds)[0]
        # absorbed = sum(rc w_rc + u w_u): the add rule's guard (1 - a_fc - a_ig) and what
        # the gates keep of their relevance (rc a / 2 for i, f, g; u for o)
        kept = _kept(K, K_sgn, abs_total, st["signed"], out=abs_total).view(T, B, 4, H)
        w_rc = (1.0 - a_fc - a_ig).addcmul_(a_ig, kept[:, :, 0] + kept[:, :, 2], value=0.5)
        w_rc.addcmul_(a_fc, kept[:, :, 1], value=0.5)
        w_u = kept[:, :, 3].clone()
        del kept
    del abs_total
    half_fc, half_ig = a_fc.mul_(0.5), a_ig.mul_(0.5)  # (in place: few big temporaries)

    def factors(K):  # K is ours (a fresh result): scale it in place
        M = K.view(T, B, 4, H)
        M[:, :, 0::2] *= half_ig.unsqueeze(2)
        M[:, :, 1] *= half_fc
        return M[:, :, :3].unbind(0), M[:, :, 3:].unbind(0)

    # every per-step tensor is [B, 1, H] or [B, 3, H]; each step's coefficients overwrite
    # its factors in place (they are not needed after: no fresh buffer to fault in)
    M3, M1 = factors(K)
    C = K.view(T, B, 4, H)
    Cf = K.view(T, B, 4 * H).unbind(0)
    back = a_fc.new_empty(B, 1, H)
    signed = K_sgn is not None
    if signed:
        S3, S1 = factors(K_sgn)
        S = K_sgn.view(T, B, 4, H)
        Sf = K_sgn.view(T, B, 4 * H).unbind(0)
        back_s = a_fc.new_empty(B, 1, H)
        Hp_half = (st["Hp"] * 0.5).unsqueeze(2).unbind(0)
    W, absW = w.W_hh, w.abs_hh
    Fc = half_fc.unsqueeze(2).unbind(0)  # f c': half to c'
    aHp_half = absHp.mul_(0.5).unsqueeze(2).unbind(0)  # (absHp is ours)
    # u and rc of every step, written over buffers already touched (no page faults in the
    # loop): u_t over R_seq_t / 2 (read just before), rc over half_ig (done with)
    U = R_seq * 0.5
    RC = half_ig
    Uu, RCu = U.unsqueeze(2).unbind(0), RC.unsqueeze(2).unbind(0)
    Rs_half = Uu  # (R_seq_t / 2 until step t overwrites it with u_t)
    u = torch.add(Rs_half[order[0]], R_h.unsqueeze(1), alpha=0.5, out=Uu[order[0]])
    rc, fc = R_c.unsqueeze(1), None
    for j, t in enumerate(order):
        # h = o tanh(c): half to o, half to c (plus what c_{t+1} passes back)
        rc = torch.add(u, rc, out=RCu[t]) if fc is None else torch.addcmul(u, rc, fc,
                                                                           out=RCu[t])
        fc = Fc[t]
        M3[t].mul_(rc)  # the coefficients, over the factors
        M1[t].mul_(u)
        torch.mm(Cf[t], absW, out=back.view(B, H))
        if signed:
            S3[t].mul_(rc)
            S1[t].mul_(u)
            torch.mm(Sf[t], W, out=back_s.view(B, H))
        if j + 1 < len(order):
            nt = order[j + 1]
            if signed:  # |h'| (.) + h' (.) as separate products: cancellations stay exact
                u = torch.add(Rs_half[nt], (aHp_half[t] * back).add_(Hp_half[t] * back_s),
                              out=Uu[nt])
            else:
                u = torch.addcmul(Rs_half[nt], aHp_half[t], back, out=Uu[nt])
    t = order[-1]
    R_h0 = (aHp_half[t] * back).mul_(2.0).view(B, H)
    if signed:
        R_h0.add_(st["Hp"][t] * back_s.view(B, H))
    coefs = [(C.view(T, B, 4 * H), S.view(T, B, 4 * H) if signed else None)]
    if plain:
        kept = torch.mv(C.view(T * B, 4 * H), babs.to(C.dtype)).sum().double()
    else:
        kept = (RC.reshape(-1).dot(w_rc.reshape(-1)) + U.reshape(-1).dot(w_u.reshape(-1))).double()
    return coefs, [R_h0], [(rc * fc).view(B, H)], kept


def _lstm_loop_streams(st, w, R_seq, R_h, R_c, RC, order, a_fc, a_ig, b, absorbed):
    """Contrastive mode: the per-relevance part of the §2 split once per step; the two
    streams travel stacked ([2, B, ·]), so every other operation serves both. Each gate
    unit's sides P and N are summed directly over the contributions (x⁺, x⁻, h'⁺, h'⁻
    against W⁺, W⁻: exact to rounding however small a side), for all steps at once, and
    relevance goes back through the same non-negative products. ``RC`` [2, T, B, H]
    receives the relevance on every c_t. Returns per stream (R_X, R_h0, R_c0)."""
    T, B, H = a_fc.shape
    AX, M_ih, kx = _signed_parts(st["X"], w.W_ih)
    AH, M_hh, kh = _signed_parts(st["Hp"], w.W_hh)
    PN = _mm2(AX, M_ih, AH, M_hh)  # [P | N] of every gate unit of every step
    P, N = PN[..., :4 * H], PN[..., 4 * H:]
    splits = contrastive_split(P, N, st["signed"], b).unbind()
    del PN, P, N
    # [step, stream, B, (cp, cn), unit]; zeroed (touched) here so that its page faults
    # come in one pass, not one step at a time inside the sequential loop
    C = a_fc.new_zeros(T, 2, B, 2, 4 * H)
    AHt = AH.unbind(0)
    R_seq = torch.stack(R_seq)  # [2, T, B, H]
    rh = torch.stack(R_h).add_(R_seq[:, order[0]])
    rc_next = torch.stack(R_c)
    for j, t in enumerate(order):
        u = rh * 0.5  # h = o tanh(c): half to o, half to c
        rc = torch.add(rc_next, u, out=RC[:, t])
        rc_next = rc * a_fc[t]
        r_ig = rc * a_ig[t]
        rc_next.mul_(0.5)
        r_ig.mul_(0.5)
        _side_coefs(torch.cat([r_ig, rc_next, r_ig, u], dim=-1), splits[t], C[t], absorbed)
        back = _receive(C[t], M_hh, AHt[t], kh)
        rh = back.add_(R_seq[:, order[j + 1]]) if j + 1 < len(order) else back
    R_X = _receive(C, M_ih, AX.unsqueeze(1), kx)  # the W_ih x part, all steps at once
    return [r.contiguous() for r in R_X.unbind(1)], list(rh.unbind(0)), list(rc_next.unbind(0))


# -- GRU --------------------------------------------------------------------------------------
def _gru_biases(w: _Weights, H: int):
    b_rz = _bias(None if w.b_ih is None else w.b_ih[:2 * H],
                 None if w.b_hh is None else w.b_hh[:2 * H])
    b_in = None if w.b_ih is None else w.b_ih[2 * H:]
    b_hn = None if w.b_hh is None else w.b_hh[2 * H:]
    return b_rz, b_in, b_hn


def gru_steps(X: Tensor, Hp: Tensor, w: _Weights) -> dict:
    """Gates of every step of one GRU layer/direction (see :func:`lstm_steps`)."""
    H = w.W_hh.shape[1]
    b_rz, b_in, b_hn = _gru_biases(w, H)
    XW, HW = _mm(X, w.W_ih), _mm(Hp, w.W_hh)
    rz = XW[..., :2 * H] + HW[..., :2 * H]
    rz = torch.sigmoid(rz + b_rz if b_rz is not None else rz)
    r, z = rz[..., :H], rz[..., H:]
    hn = HW[..., 2 * H:]
    q = r * (hn + b_hn if b_hn is not None else hn)
    ns = XW[..., 2 * H:] + q
    n = torch.tanh(ns + b_in if b_in is not None else ns)
    return {"X": X, "Hp": Hp, "XW": XW, "HW": HW, "z": z, "q": q, "n": n}


def _coefs(spec, R):
    abs_total, signed, bias, bounds = spec
    return coefficients(R, abs_total, signed, bias, bounds=bounds)


def gru_reverse(st, w, R_seq, R_h, reverse, saturate, absorbed):
    """Relevance of one GRU layer/direction: returns per-stream (R_X, R_h0)."""
    X, Hp, Q, Z = st["X"], st["Hp"], st["q"], st["z"]
    T, B = X.shape[:2]
    H = w.W_hh.shape[1]
    terms = [(1 - Z) * st["n"], Z * Hp]  # h = (1-z) n + z h'
    (a_a, a_b), _ = add_rule(X.new_ones(()), terms)  # add-rule split of unit relevance
    order = _order(T, not reverse)
    n = len(R_seq)
    if n > 1:
        RH = X.new_zeros(n, T, B, H)  # relevance on h_t (all of it; touched)
        R_X, R_h = _gru_loop_streams(st, w, R_seq, R_h, RH, order, a_a, a_b, absorbed)
        for k in range(n):  # the add rule's guard losses, all steps at once
            absorbed[k] = absorbed[k] + add_rule(RH[k], terms)[1]
        return R_X, R_h
    b_rz, b_in, b_hn = _gru_biases(w, H)
    absW_ih = w.abs_ih
    absHp = Hp.abs()
    # |contributions| and signed sums with the same operations (see lstm_reverse)
    absXW, absHW = _mm(X.abs(), absW_ih), _mm(absHp, w.abs_hh)
    XW, HW = st["XW"], st["HW"]
    sums = {  # (abs total, signed total, bias, bounds) of each weighted sum
        "rz": (absXW[..., :2 * H] + absHW[..., :2 * H],
               XW[..., :2 * H] + HW[..., :2 * H] if saturate else None,
               b_rz, _gate_bounds([SIGMOID, SIGMOID], H, X, saturate)),
        "n": (absXW[..., 2 * H:] + Q.abs(), XW[..., 2 * H:] + Q if saturate else None, b_in,
              _gate_bounds([TANH], H, X, saturate)),
        "hn": (absHW[..., 2 * H:], HW[..., 2 * H:], b_hn, None),
    }
    coefs, R_h, kept = _gru_loop(st, w, R_seq[0], R_h[0], order, a_a, a_b, sums, absHp)
    absorbed[0] = absorbed[0] + kept
    return _apply(coefs, X, w.W_ih, absW_ih), R_h


# long: as _lstm_loop, a sequential loop over time steps in place on its setup's buffers
def _gru_loop(st, w, R_seq, R_h, order, a_a, a_b, sums, absHp):
    """Default mode: the reverse walk as a linear recurrence with precomputed factors.

    Returns the §2 coefficients of the input part of every step ([(c_abs, c_sgn)],
    [T, B, 3H]), the relevance of the initial h and what the biases and guards absorbed."""
    T, B, H = a_a.shape
    Hp, Q = st["Hp"], st["q"]
    one = a_a.new_ones(())
    ((Kn, Kn_sgn),), _ = _coefs(sums["n"], one)
    ((Khn, _),), _ = _coefs(sums["hn"], one)
    ((Krz, Krz_sgn),), _ = _coefs(sums["rz"], one)
    # per unit of relevance rh on h: R_n = rh a_a / 2, R_q = R_n (Kn |q| + Kn_sgn q), half
    # of R_q to r and half to W_hn h' + b_hn, R_z = rh (a_a + a_b) / 2
    Qf = Kn * Q.abs() if Kn_sgn is None else Kn * Q.abs() + Kn_sgn * Q
    q4 = a_a * Qf * 0.25
    z2 = (a_a + a_b) * 0.5
    n2 = a_a * 0.5
    # absorbed = sum(rh w_h): the add rule's guard (1 - a_a - a_b) and what each weighted
    # sum keeps of its relevance
    keep_rz = _kept(Krz, Krz_sgn, *sums["rz"][:2])
    w_h = (1.0 - a_a - a_b).addcmul_(n2, _kept(Kn, Kn_sgn, *sums["n"][:2]))
    w_h.addcmul_(q4, _kept(Khn, None, *sums["hn"][:2]) + keep_rz[..., :H])
    w_h.addcmul_(z2, keep_rz[..., H:])
    RH = a_a.new_zeros(T, B, H)  # relevance on h_t (touched: no page faults in the loop)
    # the factors of the r, z and W_hn h' units; each step's coefficients overwrite them
    C = torch.stack([q4 * Krz[..., :H], z2 * Krz[..., H:], q4 * Khn], dim=2)
    M, Cf = C.unbind(0), C.view(T, B, 3 * H).unbind(0)
    back = a_a.new_empty(B, 1, H)
    signed = Krz_sgn is not None
    S = None
    if signed:
        Ms = torch.stack([q4 * Krz_sgn[..., :H], z2 * Krz_sgn[..., H:]], dim=2).unbind(0)
        S = a_a.new_zeros(T, B, 3, H)  # (touched) the last slot is filled after the loop
        Su = S[:, :, :2].unbind(0)
        Sf = [s.flatten(1) for s in Su]  # [B, 2H] views (row stride 3H)
        back_s = a_a.new_empty(B, 1, H)
        W_rz = w.W_hh[:2 * H]
        Hpu = Hp.unsqueeze(2).unbind(0)
    absW = w.abs_hh
    direct = (a_b * 0.5).unsqueeze(2).unbind(0)  # z h': half to h'
    aHp = absHp.unsqueeze(2).unbind(0)
    Rs, RHu = R_seq.unsqueeze(2).unbind(0), RH.unsqueeze(2).unbind(0)
    rh = torch.add(Rs[order[0]], R_h.unsqueeze(1), out=RHu[order[0]])
    for j, t in enumerate(order):
        M[t].mul_(rh)  # the coefficients, over the factors
        torch.mm(Cf[t], absW, out=back.view(B, H))
        if signed:
            torch.mul(Ms[t], rh, out=Su[t])
            torch.mm(Sf[t], W_rz, out=back_s.view(B, H))
        if j + 1 < len(order):
            nxt = torch.addcmul(Rs[order[j + 1]], rh, direct[t], out=RHu[order[j + 1]])
        else:
            nxt = rh * direct[t]
        if signed:  # |h'| (.) + h' (.) as separate products: cancellations stay exact
            rh = nxt.add_((aHp[t] * back).add_(Hpu[t] * back_s))
        else:
            rh = nxt.addcmul_(aHp[t], back)
    # the input part: coefficients of the r, z and n units (n's: R_n Kn, after the loop)
    torch.mul(RH, n2 * Kn, out=C[:, :, 2])
    if Kn_sgn is not None:
        if S is None:
            S = a_a.new_zeros(T, B, 3, H)
        torch.mul(RH, n2 * Kn_sgn, out=S[:, :, 2])  # (else S's last slot stays 0)
    coefs = [(C.view(T, B, 3 * H), None if S is None else S.view(T, B, 3 * H))]
    return coefs, [rh.view(B, H)], RH.view(-1).dot(w_h.view(-1)).double()


def _gru_loop_streams(st, w, R_seq, R_h, RH, order, a_a, a_b, absorbed):
    """Contrastive mode: the per-relevance part of the §2 split per step and weighted sum:
    the n gate (contributions ``W_in x`` and ``q``), then the r, z gates and ``W_hn h' +
    b_hn`` together (all three take their relevance from what ``q`` got). Sides P and N
    are summed directly and relevance goes back through non-negative products (see
    :func:`_lstm_loop_streams`). The two streams travel stacked ([2, B, ·]).

    Fills ``RH`` [2, T, B, H]; returns per stream (R_X, R_h0)."""
    T, B, H = a_a.shape
    Q, XW, HW = st["q"], st["XW"], st["HW"]
    b_rz, b_in, b_hn = _gru_biases(w, H)
    AX, M_ih, kx = _signed_parts(st["X"], w.W_ih)
    AH, M_hh, kh = _signed_parts(st["Hp"], w.W_hh)
    # [P | N] of the r, z, n units from x and of the r, z, W_hn h' units from h'
    PNx, PNh = _mm(AX, M_ih), _mm(AH, M_hh)
    Ph, Nh = PNh[..., :3 * H], PNh[..., 3 * H:]  # the r, z and W_hn h' units ("h units")
    Ph[..., :2 * H] += PNx[..., :2 * H]  # r and z have contributions from x too
    Nh[..., :2 * H] += PNx[..., 3 * H:5 * H]
    Qs = torch.stack([Q.clamp_min(0.0), Q.clamp_max(0.0).neg_()], dim=-2)  # q⁺, q⁻
    Pn, Nn = PNx[..., 2 * H:3 * H] + Qs[..., 0, :], PNx[..., 5 * H:] + Qs[..., 1, :]
    del PNx
    signed_h = torch.cat([XW[..., :2 * H] + HW[..., :2 * H], HW[..., 2 * H:]], dim=-1)
    b_h = None if b_rz is None and b_hn is None else torch.cat(
        [b_rz if b_rz is not None else Q.new_zeros(2 * H),
         b_hn if b_hn is not None else Q.new_zeros(H)])
    # the forward-only part of the per-unit split, for all steps at once
    splits_n = contrastive_split(Pn, Nn, XW[..., 2 * H:] + Q, b_in).unbind()
    splits_h = contrastive_split(Ph, Nh, signed_h, b_h).unbind()
    del Pn, Nn, Ph, Nh, PNh, signed_h
    # [step, stream, B, (cp, cn), unit] of the h units and of the n units (touched)
    C, Cn = a_a.new_zeros(T, 2, B, 2, 3 * H), a_a.new_zeros(T, 2, B, 2, H)
    AHt, Qt = AH.unbind(0), Qs.unbind(0)
    R_seq = torch.stack(R_seq)  # [2, T, B, H]
    rh = torch.add(torch.stack(R_h), R_seq[:, order[0]], out=RH[:, order[0]])
    for j, t in enumerate(order):
        r_a, r_b = rh * a_a[t], rh * a_b[t]
        R_z = torch.add(r_a, r_b).mul_(0.5)
        R_n, R_direct = r_a.mul_(0.5), r_b.mul_(0.5)
        _side_coefs(R_n, splits_n[t], Cn[t], absorbed)
        # q's share; r: half of it, z: R_z, W_hn h' + b_hn: the other half
        r_q = (Cn[t] * Qt[t]).sum(-2).mul_(0.5)
        _side_coefs(torch.cat([r_q, R_z, r_q], dim=-1), splits_h[t], C[t], absorbed)
        back = _receive(C[t], M_hh, AHt[t], kh).add_(R_direct)
        if j + 1 < len(order):
            rh = torch.add(back, R_seq[:, order[j + 1]], out=RH[:, order[j + 1]])
        else:
            rh = back
    C[..., 2 * H:] = Cn  # the input part: the r, z and n units
    R_X = _receive(C, M_ih, AX.unsqueeze(1), kx)
    return [r.contiguous() for r in R_X.unbind(1)], list(rh.unbind(0))


# -- whole modules ----------------------------------------------------------------------------
def _kernel(lstm: bool, X: Tensor, hx: list[Tensor], ws: list[_Weights]) -> Tensor:
    """Output sequence of one layer (all its directions) from the fused kernel."""
    flat = [p for w in ws for p in (w.W_ih, w.W_hh, w.b_ih, w.b_hh) if p is not None]
    has_bias = ws[0].b_ih is not None
    bidi = len(ws) == 2
    if lstm:
        return torch._VF.lstm(X, tuple(hx), flat, has_bias, 1, 0.0, False, bidi, False)[0]
    return torch._VF.gru(X, hx[0], flat, has_bias, 1, 0.0, False, bidi, False)[0]


def unroll(m: nn.RNNBase, X: Tensor, states: list[Tensor | None], param,
           top: Tensor | None = None, **keep) -> tuple:
    """Recompute every layer and direction of an ``nn.LSTM``/``nn.GRU`` (time-major ``X``
    [T, B, in], ``states`` [L*D, B, H] or ``None`` for zeros; ``top``, if given, the
    recorded output sequence, time-major; ``keep``: options of :func:`lstm_steps`).
    Returns the input of each layer plus the last layer's output, the per-(layer,
    direction) caches and weights."""
    lstm = isinstance(m, nn.LSTM)
    L, D, H = m.num_layers, 2 if m.bidirectional else 1, m.hidden_size
    zeros = X.new_zeros(L * D, X.shape[1], H)
    states = [zeros if s is None else s for s in states]
    layer_in, caches, weights = [X.contiguous()], [], []
    for layer in range(L):
        ws = [_weights(param, m, f"_l{layer}" + ("_reverse" if d else ""), X.dtype)
              for d in range(D)]
        Xl, rows = layer_in[-1], slice(layer * D, (layer + 1) * D)
        if layer == L - 1 and top is not None:
            Y = top
        else:
            Y = _kernel(lstm, Xl, [s[rows] for s in states], ws)
        for d in range(D):
            k = layer * D + d
            Hp = _shift(Y[..., d * H:(d + 1) * H], states[0][k], bool(d))
            if lstm:
                caches.append(lstm_steps(Xl, Hp, states[1][k], ws[d], bool(d), **keep))
            else:
                caches.append(gru_steps(Xl, Hp, ws[d]))
        weights.extend(ws)
        layer_in.append(Y)
    return layer_in, caches, weights


def _hidden(st: dict, lstm: bool) -> Tensor:
    """The hidden state of every step, from the recomputed gates."""
    if lstm:
        return st["o"] * torch.tanh(st["C"])
    return (1 - st["z"]) * st["n"] + st["z"] * st["Hp"]


@torch.no_grad()
def recompute(m: Any, x: Tensor, hx=None, param=fetch_param):
    """What ``m(x, hx)`` returns, recomputed from the gates the rules see (for checking the
    rules against the module; ``m`` an LSTM, GRU, LSTMCell or GRUCell)."""
    lstm = isinstance(m, (nn.LSTM, nn.LSTMCell))
    hx = [] if hx is None else [hx] if isinstance(hx, Tensor) else list(hx)
    if isinstance(m, (nn.LSTMCell, nn.GRUCell)):
        X = x.reshape(1, -1, x.shape[-1])
        B, H = X.shape[1], m.hidden_size
        states = [s.reshape(1, B, H) for s in hx] or [X.new_zeros(1, B, H)] * 2
        w = _weights(param, m, "", X.dtype)
        if lstm:
            st = lstm_steps(X, states[0], states[1][0], w, reverse=False, keep_o=True)
            return _hidden(st, True).reshape(x.shape[:-1] + (H,)), st["C"].reshape(
                x.shape[:-1] + (H,))
        return _hidden(gru_steps(X, states[0], w), False).reshape(x.shape[:-1] + (H,))
    batched = x.dim() == 3
    X = x.unsqueeze(1) if not batched else x.transpose(0, 1) if m.batch_first else x
    L, D, H = m.num_layers, 2 if m.bidirectional else 1, m.hidden_size
    shape = (L * D, X.shape[1], H)
    states = [s.reshape(shape) for s in hx] or [None, None]
    keep: dict[str, Any] = {"keep_o": True} if lstm else {}
    _, caches, _ = unroll(m, X, states, param, **keep)
    T = X.shape[0]
    hs = [_hidden(st, lstm) for st in caches]
    out = torch.cat(hs[-D:], dim=-1)
    out = out.squeeze(1) if not batched else out.transpose(0, 1) if m.batch_first else out
    ends = [_last(T, bool(k % D)) for k in range(L * D)]
    finals = [torch.stack([h[e] for h, e in zip(hs, ends)])]
    if lstm:
        finals.append(torch.stack([st["C"][e] for st, e in zip(caches, ends)]))
    finals = [f if batched else f.squeeze(1) for f in finals]
    return (out, tuple(finals)) if lstm else (out, finals[0])


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
    if not cell and m.proj_size:
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
    first = streams_of(next(r for r in R_out if r is not None))
    return len(first), first[0].dtype


def _stream_list(R_out, i: int, shape, n: int, like: Tensor) -> list[Tensor]:
    """Relevance on output ``i`` as a per-stream list shaped ``shape`` (zeros if none)."""
    if i >= len(R_out) or R_out[i] is None:
        return [like.new_zeros(shape) for _ in range(n)]
    return [r.to(like.dtype).reshape(shape) for r in streams_of(R_out[i])]


def _time_major(t: Tensor, batched: bool, batch_first: bool) -> Tensor:
    return t.unsqueeze(1) if not batched else t.transpose(0, 1) if batch_first else t


def _recorded_output(rec, dt: torch.dtype, batched: bool, batch_first: bool):
    """The recorded output sequence, time-major, if it is intact and already in ``dt``."""
    if not rec.outputs or not rec.output_intact(0):
        return None
    out = rec.output_value(0)
    if out.dtype != dt:
        return None
    return _time_major(out, batched, batch_first)


def _result(rec, R_x: list[Tensor], R_init, given: list[bool], r_dtype: torch.dtype,
            absorbed: list[Tensor]) -> tuple[list[Tensor | None], Tensor]:
    """What a recurrent rule returns: relevance on the input (``R_x`` per stream, shaped
    like it), on the initial states (per state, per stream) where the call passed them, and
    what was absorbed; an implicit zero state normally receives nothing, and what does
    arrive there counts as absorbed."""
    R_in: list[Tensor | None] = [None] * len(rec.inputs)
    R_in[0] = stack([r.to(r_dtype) for r in R_x])
    for j, states in enumerate(R_init):
        if given[j]:
            shape = rec.inputs[1 + j].shape
            R_in[1 + j] = stack([r.reshape(shape).to(r_dtype) for r in states])
        else:
            for s, r in enumerate(states):
                absorbed[s] = absorbed[s] + r.double().sum()
    return R_in, stack(absorbed)


def _layers_reverse(rec: Record, R_out: list[Tensor | None], ctx: RuleContext,
                    x0: Tensor, dt: torch.dtype, lstm: bool,
                    absorbed: list[Tensor]):
    """``nn.LSTM``/``nn.GRU``: every layer and direction, last layer first. Returns the
    relevance of the input (per stream, in its layout), of the initial states and which
    states the call passed."""
    m = rec.module
    batched = x0.dim() == 3
    X = _time_major(x0.to(dt), batched, m.batch_first)
    T, B = X.shape[0], X.shape[1]
    L, D, H = m.num_layers, 2 if m.bidirectional else 1, m.hidden_size
    n_state = 2 if lstm else 1
    states = _initial_states(rec, n_state, (L * D, B, H), dt)
    given = [s is not None for s in states]
    top = _recorded_output(rec, dt, batched, m.batch_first)
    saturate = ctx.saturation and not ctx.contrastive
    keep = {"keep_signed": saturate or ctx.contrastive} if lstm else {}
    layer_in, caches, weights = unroll(m, X, states, ctx.param, top, **keep)

    # relevance on the outputs, per stream, time-major
    n = len(absorbed)
    R_seq = [X.new_zeros(T, B, D * H) for _ in range(n)]
    if R_out[0] is not None:
        R_seq = [_time_major(r.to(dt), batched, m.batch_first) for r in streams_of(R_out[0])]
    R_final = [_stream_list(R_out, 1 + j, (L * D, B, H), n, X) for j in range(n_state)]

    R_init = [[X.new_zeros(L * D, B, H) for _ in range(n)] for _ in range(n_state)]
    for layer in reversed(range(L)):
        R_next = None
        for d in range(D):
            k = layer * D + d
            st, w = caches[k], weights[k]
            R_dir = [r[..., d * H:(d + 1) * H] for r in R_seq]
            R_h = [r[k] for r in R_final[0]]
            if lstm:
                R_c = [r[k] for r in R_final[1]]
                R_X, R_h0, R_c0 = lstm_reverse(st, w, R_dir, R_h, R_c, bool(d), saturate,
                                               absorbed)
                for s in range(n):
                    R_init[1][s][k] = R_c0[s]
            else:
                R_X, R_h0 = gru_reverse(st, w, R_dir, R_h, bool(d), saturate, absorbed)
            for s in range(n):
                R_init[0][s][k] = R_h0[s]
            R_next = R_X if R_next is None else [a + b for a, b in zip(R_next, R_X)]
        R_seq = R_next

    R_x = [r.squeeze(1) if not batched else (r.transpose(0, 1) if m.batch_first else r)
           for r in R_seq]
    return R_x, R_init, given


def _cell_reverse(rec: Record, R_out: list[Tensor | None], ctx: RuleContext,
                  x0: Tensor, dt: torch.dtype, lstm: bool,
                  absorbed: list[Tensor]):
    """``nn.LSTMCell``/``nn.GRUCell``: one step (as :func:`_layers_reverse`)."""
    m = rec.module
    X = x0.to(dt).reshape(1, -1, x0.shape[-1])  # [T=1, B, in]
    B, H = X.shape[1], m.hidden_size
    n_state = 2 if lstm else 1
    states = _initial_states(rec, n_state, (B, H), dt)
    given = [s is not None for s in states]
    states = [X.new_zeros(B, H) if s is None else s for s in states]
    w = _weights(ctx.param, m, "", dt)
    n = len(absorbed)
    R_fin = [_stream_list(R_out, j, (B, H), n, X) for j in range(n_state)]
    R_seq = [X.new_zeros(1, B, H) for _ in range(n)]
    saturate = ctx.saturation and not ctx.contrastive
    Hp = states[0].unsqueeze(0)
    if lstm:
        st = lstm_steps(X, Hp, states[1], w, reverse=False,
                        keep_signed=saturate or ctx.contrastive)
        R_X, R_h0, R_c0 = lstm_reverse(st, w, R_seq, R_fin[0], R_fin[1], False, saturate,
                                       absorbed)
        R_init = [R_h0, R_c0]
    else:
        st = gru_steps(X, Hp, w)
        R_X, R_h0 = gru_reverse(st, w, R_seq, R_fin[0], False, saturate, absorbed)
        R_init = [R_h0]
    return [r.reshape(x0.shape) for r in R_X], R_init, given


@torch.no_grad()
def recurrent_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``nn.LSTM`` and ``nn.GRU`` unrolled (all layers, both directions), ``nn.LSTMCell``
    and ``nn.GRUCell`` (one step); the initial states the call passed (``(h0, c0)``,
    ``h0``) get relevance."""
    m = rec.module
    cell = isinstance(m, nn.RNNCellBase)
    _check(rec, cell=cell)
    x0 = rec.input_value(0)
    dt = _compute_dtype(x0, R_out)
    n, r_dtype = _stream_info(R_out)
    absorbed = [x0.new_zeros((), dtype=torch.float64) for _ in range(n)]
    walk = _cell_reverse if cell else _layers_reverse
    R_x, R_init, given = walk(rec, R_out, ctx, x0, dt, isinstance(m, (nn.LSTM, nn.LSTMCell)),
                              absorbed)
    R_in, total = _result(rec, R_x, R_init, given, r_dtype, absorbed)
    return RuleResult(R_in, total)


# the rule's names before one function served the four module types
lstm_rule = gru_rule = lstm_cell_rule = gru_cell_rule = recurrent_rule
for _cls, _name in ((nn.LSTM, "lstm"), (nn.GRU, "gru"), (nn.LSTMCell, "lstm_cell"),
                    (nn.GRUCell, "gru_cell")):
    register_rule(_cls, per_target(recurrent_rule), name=_name)
