"""Attention (METHOD.md §4): the relevance core against a literal per-pair reference, and the
``nn.MultiheadAttention`` rule (recomputation, reference, conservation, errors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_conserved
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dlbhooks as dlb
from dlbhooks.rules.attention import (
    attention_output,
    attention_probabilities,
    attention_relevance,
    mha_recompute,
)

DT = torch.float64


# -- slow, literal references ---------------------------------------------------------------


def ref_attention(R_O, Q, K, V, scale, keep=None, add=None, sinks=None):
    """Per head, loops over i, j, d: every pair's share computed one by one.

    ``keep``: bool [B, H, Tq, Tk] (True = attend); ``add``: float [B, H, Tq, Tk];
    ``sinks``: [H]. Returns (R_Q, R_K, R_V, lost).
    """
    B, H, Tq, d = Q.shape
    Hkv, Tk, dv = K.shape[1], K.shape[2], V.shape[3]
    g = H // Hkv
    q, k, v, r = Q.tolist(), K.tolist(), V.tolist(), R_O.tolist()
    kp = keep.tolist() if keep is not None else None
    ad = add.tolist() if add is not None else None
    sk = sinks.tolist() if sinks is not None else None
    RQ = [[[[0.0] * d for _ in range(Tq)] for _ in range(H)] for _ in range(B)]
    RK = [[[[0.0] * d for _ in range(Tk)] for _ in range(Hkv)] for _ in range(B)]
    RV = [[[[0.0] * dv for _ in range(Tk)] for _ in range(Hkv)] for _ in range(B)]
    lost = 0.0
    for b in range(B):
        for h in range(H):
            kh = h // g
            for i in range(Tq):
                logits = {}
                for j in range(Tk):
                    if kp is not None and not kp[b][h][i][j]:
                        continue
                    s = scale * sum(q[b][h][i][e] * k[b][kh][j][e] for e in range(d))
                    if ad is not None:
                        s += ad[b][h][i][j]
                    if s != -math.inf:
                        logits[j] = s
                cols = list(logits.values()) + ([sk[h]] if sk is not None else [])
                A, p_sink = {}, 0.0
                if cols:
                    mx = max(cols)
                    Z = sum(math.exp(c - mx) for c in cols)
                    A = {j: math.exp(s - mx) / Z for j, s in logits.items()}
                    p_sink = math.exp(sk[h] - mx) / Z if sk is not None else 0.0
                RA = [0.0] * Tk
                for dd in range(dv):  # O_id = sum_j A_ij V_jd
                    r_id = r[b][h][i][dd]
                    lost += r_id * p_sink
                    r_id -= r_id * p_sink
                    den = sum(A[j] * abs(v[b][kh][j][dd]) for j in A)
                    if den == 0:
                        lost += r_id
                        continue
                    for j in A:
                        share = r_id * A[j] * abs(v[b][kh][j][dd]) / den
                        RA[j] += share / 2
                        RV[b][kh][j][dd] += share / 2
                for j in range(Tk):  # S_ij = scale sum_e Q_ie K_je + B_ij
                    # a finite additive score is a bias of step 3 (METHOD §4): its |B_ij|
                    # counts in the denominator and its share is absorbed
                    bias = ad[b][h][i][j] if ad is not None and ad[b][h][i][j] > -1e30 else 0.0
                    terms = [abs(scale * q[b][h][i][e] * k[b][kh][j][e]) for e in range(d)]
                    den = sum(terms) + abs(bias)
                    if den == 0:
                        lost += RA[j]
                        continue
                    lost += RA[j] * abs(bias) / den
                    for e in range(d):
                        share = RA[j] * terms[e] / den
                        RQ[b][h][i][e] += share / 2
                        RK[b][kh][j][e] += share / 2
    t = lambda x: torch.tensor(x, dtype=DT)  # noqa: E731
    return t(RQ), t(RK), t(RV), lost


def ref_linear(R, a, W, b):
    """§2, literally: R_in_i = sum_j R_j |W_ji a_i| / (sum_i |W_ji a_i| + |b_j|)."""
    shape = a.shape
    R2, a2 = R.reshape(-1, R.shape[-1]).tolist(), a.reshape(-1, a.shape[-1]).tolist()
    Wl = W.tolist()
    bl = b.tolist() if b is not None else [0.0] * len(Wl)
    out = [[0.0] * len(a2[0]) for _ in a2]
    for row in range(len(a2)):
        for j in range(len(Wl)):
            T = sum(abs(Wl[j][i] * a2[row][i]) for i in range(len(a2[row]))) + abs(bl[j])
            if T == 0:
                continue
            for i in range(len(a2[row])):
                out[row][i] += R2[row][j] * abs(Wl[j][i] * a2[row][i]) / T
    return torch.tensor(out, dtype=DT).reshape(shape)


# -- the core against the reference -----------------------------------------------------------


def _case(name, gen):
    """(Q, K, V, compact mask for the rule, keep, add, sinks) for one scenario."""
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    B, Tq, Tk, d, dv = 2, 4, 5, 3, 2
    H, Hkv = (4, 2) if name in ("gqa_causal", "gqa_float", "sinks") else (2, 2)
    if "causal" in name:
        Tk = Tq
    Q, K, V = r(B, H, Tq, d), r(B, Hkv, Tk, d), r(B, Hkv, Tk, dv)
    full = (B, H, Tq, Tk)
    mask = keep = add = sinks = None
    if name == "padding":
        mask = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
        mask[1, ..., -2:] = False
        keep = mask.expand(full)
    elif name == "causal":
        mask = torch.ones(Tq, Tk, dtype=torch.bool).tril()
        keep = mask.expand(full)
    elif name == "gqa_causal":
        mask = torch.zeros(Tq, Tk, dtype=DT).masked_fill(
            ~torch.ones(Tq, Tk, dtype=torch.bool).tril(), float("-inf"))
        add = mask.expand(full)
    elif name == "gqa_float":
        mask = r(B, H, Tq, Tk)
        add = mask
    elif name == "sinks":
        mask = torch.ones(B, 1, 1, Tk, dtype=torch.bool)
        mask[0, ..., :3] = False
        keep = mask.expand(full)
        sinks = r(H)
    elif name == "guards":  # a fully masked row, a zero query, a zero value column
        mask = torch.ones(B, H, Tq, Tk, dtype=torch.bool)
        mask[0, 1, 2] = False
        keep = mask
        Q[1, 0, 3] = 0.0
        V[0, 1, :, 1] = 0.0
    return Q, K, V, mask, keep, add, sinks


CASES = ["plain", "padding", "causal", "gqa_causal", "gqa_float", "sinks", "guards"]


@pytest.mark.parametrize("name", CASES)
def test_core_matches_reference_both_streams(name):
    gen = torch.Generator().manual_seed(CASES.index(name))
    Q, K, V, mask, keep, add, sinks = _case(name, gen)
    B, H, Tq, _ = Q.shape
    R_pos = torch.rand(B, H, Tq, V.shape[-1], generator=gen, dtype=DT)
    R_neg = torch.rand(B, H, Tq, V.shape[-1], generator=gen, dtype=DT)
    scale = 0.7
    for chunk in (2, 256):
        res = attention_relevance(torch.stack((R_pos, R_neg)), Q, K, V, scale=scale, mask=mask,
                                  sinks=sinks, chunk=chunk)
        for stream, R in ((0, R_pos), (1, R_neg)):
            rq, rk, rv, lost = ref_attention(R, Q, K, V, scale, keep, add, sinks)
            got = [x[stream] for x in res]
            err = max((got[0] - rq).abs().max(), (got[1] - rk).abs().max(),
                      (got[2] - rv).abs().max(), abs(float(got[3]) - lost))
            assert err < 1e-12, f"{name} chunk={chunk} stream={stream}: max error {err}"
            total = got[0].sum() + got[1].sum() + got[2].sum() + got[3]
            assert abs(float(total - R.sum())) < 1e-12 * float(R.abs().sum())
    if name in ("guards", "sinks"):
        assert float(res.absorbed[0]) > 1e-3  # the guard / sink cases do absorb


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 2), Hkv=st.integers(1, 2), g=st.integers(1, 3), Tq=st.integers(1, 5),
    Tk=st.integers(1, 5), d=st.integers(1, 3), chunk=st.integers(1, 4),
    kind=st.sampled_from(["none", "bool", "float", "sinks"]), seed=st.integers(0, 2**16),
)
def test_core_random_shapes_conserve_and_match_reference(B, Hkv, g, Tq, Tk, d, chunk, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    H = Hkv * g
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    Q, K, V = r(B, H, Tq, d), r(B, Hkv, Tk, d), r(B, Hkv, Tk, d + 1)
    R = r(B, H, Tq, d + 1)  # signed relevance: conservation does not need a sign
    mask = keep = add = sinks = None
    if kind == "bool":
        mask = torch.rand(B, 1, Tq, Tk, generator=gen) > 0.3
        keep = mask.expand(B, H, Tq, Tk)
    elif kind == "float":
        mask = r(1, H, Tq, Tk)
        add = mask.expand(B, H, Tq, Tk)
    elif kind == "sinks":
        sinks = r(H)
    rq, rk, rv, ab = (x[0] for x in attention_relevance(  # one stream: R stacked as [1, ...]
        R[None], Q, K, V, scale=0.5, mask=mask, sinks=sinks, chunk=chunk))
    assert rq.shape == Q.shape and rk.shape == K.shape and rv.shape == V.shape
    total = rq.sum() + rk.sum() + rv.sum() + ab
    assert abs(float(total - R.sum())) <= 1e-12 * float(R.abs().sum())
    eq, ek, ev, lost = ref_attention(R, Q, K, V, 0.5, keep, add, sinks)
    # (measured <= 8.9e-15 over 3000 random cases, entries of order 1)
    for got, want in ((rq, eq), (rk, ek), (rv, ev)):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert abs(float(ab) - lost) < 1e-12


def test_gqa_equals_repeated_heads_summed():
    gen = torch.Generator().manual_seed(3)
    Q = torch.randn(2, 6, 5, 4, generator=gen, dtype=DT)
    K = torch.randn(2, 2, 7, 4, generator=gen, dtype=DT)
    V = torch.randn(2, 2, 7, 3, generator=gen, dtype=DT)
    R = torch.rand(2, 6, 5, 3, generator=gen, dtype=DT)
    mask = torch.randn(2, 6, 5, 7, generator=gen, dtype=DT)
    grouped = attention_relevance(R[None], Q, K, V, scale=0.4, mask=mask, chunk=2)
    Kr, Vr = K.repeat_interleave(3, dim=1), V.repeat_interleave(3, dim=1)
    rep = attention_relevance(R[None], Q, Kr, Vr, scale=0.4, mask=mask)
    assert torch.allclose(grouped.R_Q, rep.R_Q, rtol=0, atol=1e-13)  # (measured 2.2e-16)
    assert torch.allclose(grouped.R_K[0], rep.R_K[0].view(2, 2, 3, 7, 4).sum(2), rtol=0,
                          atol=1e-13)
    assert torch.allclose(grouped.R_V[0], rep.R_V[0].view(2, 2, 3, 7, 3).sum(2), rtol=0,
                          atol=1e-13)


def test_calls_in_one_scratch_session_equal_calls_without_one():
    """The reused blocks (grown, shrunk, shared by calls of other shapes) and the mask's
    plan kept for the session give exactly what fresh temporaries give."""
    from dlbhooks import scratch

    gen = torch.Generator().manual_seed(5)
    cases = []
    for B, H, Hkv, T, d in ((1, 4, 2, 9, 3), (2, 2, 2, 5, 4), (1, 4, 2, 9, 3)):
        Q = torch.randn(B, H, T, d, generator=gen, dtype=DT)
        K = torch.randn(B, Hkv, T, d, generator=gen, dtype=DT)
        V = torch.randn(B, Hkv, T, d, generator=gen, dtype=DT)
        R = torch.randn(2, B, H, T, d, generator=gen, dtype=DT)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        cases.append((R, Q, K, V, causal))
    cases.append(cases[0][:4] + (cases[0][4].clone(),))  # the same mask values, new tensor
    fresh = [attention_relevance(*c[:4], scale=0.3, mask=c[4], chunk=4) for c in cases]
    with scratch.session():
        reused = [attention_relevance(*c[:4], scale=0.3, mask=c[4], chunk=4) for c in cases]
        cases[0][4][0, 0] = False  # changed in place: the plan must follow
        changed = attention_relevance(*cases[0][:4], scale=0.3, mask=cases[0][4], chunk=4)
    for a, b in zip(fresh, reused):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    want = attention_relevance(*cases[0][:4], scale=0.3, mask=cases[0][4], chunk=4)
    for x, y in zip(changed, want):
        assert torch.equal(x, y)
    assert not torch.equal(changed.R_Q, fresh[0].R_Q)


def test_attention_output_and_probabilities_match_torch():
    gen = torch.Generator().manual_seed(4)
    Q = torch.randn(2, 4, 6, 3, generator=gen, dtype=DT)
    K = torch.randn(2, 2, 6, 3, generator=gen, dtype=DT)
    V = torch.randn(2, 2, 6, 5, generator=gen, dtype=DT)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(Q, K.repeat_interleave(2, 1), V.repeat_interleave(2, 1),
                                          attn_mask=causal)
    got = attention_output(Q, K, V, scale=1 / math.sqrt(3), mask=causal, chunk=4)
    assert (got - want).abs().max() < 1e-14
    sinks = torch.randn(4, generator=gen, dtype=DT)
    A = attention_probabilities(Q, K, scale=0.3, mask=causal, sinks=sinks)
    logits = (Q @ K.repeat_interleave(2, 1).transpose(-1, -2) * 0.3).masked_fill(~causal, -math.inf)
    full = torch.cat([logits, sinks.view(1, 4, 1, 1).expand(2, 4, 6, 1)], -1).softmax(-1)
    assert (A - full[..., :-1]).abs().max() < 1e-14


def test_core_rejects_bad_shapes():
    Q, K = torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 2, 4)
    with pytest.raises(ValueError, match="multiple"):
        attention_relevance(torch.zeros(1, 1, 3, 2, 4), Q, K, K, scale=1.0)
    Q = torch.zeros(1, 2, 2, 4)
    with pytest.raises(ValueError, match="broadcast"):
        attention_relevance(torch.zeros(1, 1, 2, 2, 4), Q, K, K, scale=1.0,
                            mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="R_O"):
        attention_relevance(torch.zeros(1, 1, 2, 2, 3), Q, K, K, scale=1.0)


# -- nn.MultiheadAttention ------------------------------------------------------------------

E, H, L, S, N = 8, 2, 3, 4, 2

MODULES = {
    "self_bf": dict(batch_first=True),
    "self_seq": dict(batch_first=False),
    "cross_kvdim": dict(batch_first=True, kdim=6, vdim=5),
    "cross_nobias": dict(batch_first=False, bias=False),
    "bias_kv": dict(batch_first=True, add_bias_kv=True),
    "zero_attn": dict(batch_first=True, add_zero_attn=True),
    "bias_kv_zero_kvdim": dict(batch_first=False, add_bias_kv=True, add_zero_attn=True,
                               kdim=6, vdim=5),
}
CALLS = ["plain", "kpm_bool", "kpm_float", "mask_bool_2d", "mask_float_3d", "weights_per_head",
         "causal_hint", "unbatched"]


def _mha(cfg, seed=0):
    torch.manual_seed(seed)
    m = nn.MultiheadAttention(E, H, **cfg).to(DT).eval()
    with torch.no_grad():  # non-zero biases so that their shares show
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5)
    return m


def _mha_args(cfg, call, gen):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=DT)  # noqa: E731
    unb = call == "unbatched"
    Lq, Sk = (L, L) if call == "causal_hint" else (L, S)

    def seq(T, dim):
        if unb:
            return r(T, dim)
        return r(N, T, dim) if cfg.get("batch_first") else r(T, N, dim)

    kdim, vdim = cfg.get("kdim", E), cfg.get("vdim", E)
    if kdim == vdim == E and Lq == Sk and "self" in _name(cfg):
        q = k = v = seq(Lq, E)
    else:
        q, k, v = seq(Lq, E), seq(Sk, kdim), seq(Sk, vdim)
    kw = dict(query=q, key=k, value=v)
    pad = torch.zeros(N, Sk, dtype=torch.bool)
    pad[1, -1] = True
    if call == "kpm_bool":
        kw["key_padding_mask"] = pad
    elif call == "kpm_float":
        kw["key_padding_mask"] = r(N, Sk).masked_fill(pad, -1e9)  # -inf: see api NaN/inf check
    elif call == "mask_bool_2d":
        am = torch.zeros(Lq, Sk, dtype=torch.bool)
        am[0, 1] = am[2, 0] = True
        kw["attn_mask"] = am
    elif call == "mask_float_3d":
        kw["attn_mask"] = r(N * H, Lq, Sk)
        kw["need_weights"] = False
    elif call == "weights_per_head":
        kw["need_weights"], kw["average_attn_weights"] = True, False
    elif call == "causal_hint":
        kw["attn_mask"] = ~torch.ones(Lq, Sk, dtype=torch.bool).tril()
        kw["is_causal"], kw["need_weights"] = True, False
    return kw


def _name(cfg):
    return next(k for k, v in MODULES.items() if v == cfg)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("mod", list(MODULES))
def test_mha_recomputed_output_equals_module(mod, call):
    m = _mha(MODULES[mod])
    kw = _mha_args(MODULES[mod], call, torch.Generator().manual_seed(1))
    with dlb.trace(m) as tape:
        out, _ = m(**kw)
    rec = tape.last_root()
    assert torch.allclose(mha_recompute(rec), out, rtol=0, atol=1e-13)
    exp = tape.explain(torch.rand(out.shape, dtype=DT))
    assert_conserved(exp)


def _ref_mha(m, kw, seed):
    """The whole MHA rule from the literal references (default mode, no saturation)."""
    bf = m.batch_first
    t = (lambda x: x) if bf else (lambda x: x.transpose(0, 1))
    q_in, k_in, v_in = t(kw["query"]), t(kw["key"]), t(kw["value"])
    Wq, Wk, Wv = m.in_proj_weight.detach().chunk(3) if m._qkv_same_embed_dim else (
        m.q_proj_weight.detach(), m.k_proj_weight.detach(), m.v_proj_weight.detach())
    bq, bk, bv = m.in_proj_bias.detach().chunk(3)
    split = lambda x: x.reshape(x.shape[0], x.shape[1], H, E // H).transpose(1, 2)  # noqa: E731
    merge = lambda x: x.transpose(1, 2).reshape(x.shape[0], x.shape[2], E)  # noqa: E731
    q, k = split(F.linear(q_in, Wq, bq)), split(F.linear(k_in, Wk, bk))
    v = split(F.linear(v_in, Wv, bv))
    keep = None
    if "key_padding_mask" in kw:
        keep = (~kw["key_padding_mask"]).view(N, 1, 1, -1).expand(N, H, q.shape[2], k.shape[2])
    scale = 1 / math.sqrt(E // H)
    logits = q @ k.transpose(-1, -2) * scale
    if keep is not None:
        logits = logits.masked_fill(~keep, -math.inf)
    O = merge(logits.softmax(-1) @ v)
    R_y = t(seed)
    R_O = ref_linear(R_y, O, m.out_proj.weight.detach(), m.out_proj.bias.detach())
    rq, rk, rv, _ = ref_attention(split(R_O), q, k, v, scale, keep)
    return (t(ref_linear(merge(rq), q_in, Wq, bq)), t(ref_linear(merge(rk), k_in, Wk, bk)),
            t(ref_linear(merge(rv), v_in, Wv, bv)))


@pytest.mark.parametrize("mod,call", [("cross_kvdim", "kpm_bool"), ("self_seq", "plain"),
                                      ("self_bf", "weights_per_head")])
def test_mha_rule_matches_reference(mod, call):
    m = _mha(MODULES[mod], seed=5)
    gen = torch.Generator().manual_seed(6)
    kw = _mha_args(MODULES[mod], call, gen)
    with dlb.trace(m) as tape:
        out, _ = m(**kw)
    seed = torch.rand(out.shape, generator=gen, dtype=DT)
    exp = tape.explain(seed)
    want = _ref_mha(m, kw, seed)
    for name, w in zip(("query", "key", "value"), want):
        err = (exp.inputs[name] - w).abs().max()
        assert err < 1e-12, f"{name}: max error {err}"
    assert_conserved(exp)
    assert float(exp.ledger[0].absorbed) > 0  # the projection biases keep a share


class SelfAttnNet(nn.Module):
    def __init__(self, batch_first, **kw):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Linear(5, E)
        self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first, **kw)
        self.act = nn.Tanh()
        self.flat = nn.Flatten()
        self.head = nn.Linear(E * L, 3)

    def forward(self, x, pad):
        h = self.emb(x if self.batch_first else x.transpose(0, 1))
        a, _ = self.mha(h, h, h, key_padding_mask=pad, need_weights=True)
        a = self.act(a)
        return self.head(self.flat(a if self.batch_first else a.transpose(0, 1)))


class CrossAttnNet(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.q_emb = nn.Linear(5, E)
        self.k_emb = nn.Linear(7, 6)
        self.mha = nn.MultiheadAttention(E, H, kdim=6, vdim=7, batch_first=True, **kw)
        self.flat = nn.Flatten()
        self.head = nn.Linear(E * L, 3)

    def forward(self, x, mem, mask):
        a, _ = self.mha(self.q_emb(x), self.k_emb(mem), mem, attn_mask=mask, need_weights=False)
        return self.head(self.flat(a))


def _randomize(model):
    torch.manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.6)
    return model.to(DT).eval()


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_model_conserves_both_modes(batch_first):
    model = _randomize(SelfAttnNet(batch_first))
    x = torch.randn(N, L, 5, dtype=DT)
    pad = torch.tensor([[False, False, False], [False, False, True]])
    for mode in ("default", "contrastive"):
        exp = dlb.explain(model, (x, pad), mode=mode)
        assert_conserved(exp)
        assert exp.at("mha").shape == ((N, L, E) if batch_first else (L, N, E))
        assert exp.inputs["x"].abs().sum() > 0
    # q, k and v are one tensor: the embedding receives the three contributions summed
    exp = dlb.explain(model, (x, pad))
    q_k_v = exp.tensors["mha"][:3]
    assert all(float(t.abs().sum()) > 0 for t in q_k_v)
    emb = next(e for e in exp.ledger if e.key == "emb")
    assert abs(emb.relevance_out - float(sum(t.sum() for t in q_k_v))) < 1e-12 * 200


@pytest.mark.parametrize("kw", [{}, dict(add_bias_kv=True, add_zero_attn=True)])
def test_cross_attention_model_conserves_both_modes(kw):
    model = _randomize(CrossAttnNet(**kw))
    gen = torch.Generator().manual_seed(8)
    x, mem = torch.randn(N, L, 5, generator=gen, dtype=DT), torch.randn(N, S, 7, generator=gen,
                                                                         dtype=DT)
    mask = torch.zeros(L, S, dtype=torch.bool)
    mask[1, :2] = True
    for mode in ("default", "contrastive"):
        exp = dlb.explain(model, (x, mem, mask), mode=mode)
        assert_conserved(exp)
        # relevance reaches mem through both the key and the value path
        assert exp.at("mha", 1).abs().sum() > 1 and exp.at("mha", 2).abs().sum() > 1
        assert exp.at("mha", 1).shape == (N, S, 6) and exp.at("mha", 2).shape == (N, S, 7)


def test_training_dropout_is_a_clear_error():
    model = _randomize(SelfAttnNet(True, dropout=0.5)).train()
    x = torch.randn(N, L, 5, dtype=DT)
    with pytest.raises(dlb.UnsupportedModuleError, match="eval"):
        dlb.explain(model, (x, None))


def test_t5_style_position_bias_and_cross_attention_match_the_reference():
    """Decoder queries over encoder keys (cross-attention: T_q != T_k), scores with a
    relative-position bias (finite, a bias of step 3: its share absorbed) and padded keys
    (closed: nothing)."""
    gen = torch.Generator().manual_seed(21)
    B, H, Tq, Tk, d = 2, 2, 3, 6, 4
    Q, K = torch.randn(B, H, Tq, d, generator=gen, dtype=DT), torch.randn(B, H, Tk, d,
                                                                           generator=gen,
                                                                           dtype=DT)
    V = torch.randn(B, H, Tk, 5, generator=gen, dtype=DT)
    table = torch.randn(H, 2 * Tk, generator=gen, dtype=DT)  # a relative-position table
    rel = (torch.arange(Tk)[None, :] - torch.arange(Tq)[:, None]) + Tk
    bias = table[:, rel].unsqueeze(0).expand(B, H, Tq, Tk)
    pad = torch.ones(B, Tk, dtype=torch.bool)
    pad[1, 4:] = False
    mask = bias.masked_fill(~pad[:, None, None, :], torch.finfo(DT).min)
    R = torch.rand(B, H, Tq, 5, generator=gen, dtype=DT)
    got = attention_relevance(R[None], Q, K, V, scale=1.0, mask=mask)
    keep = pad[:, None, None, :].expand(B, H, Tq, Tk)
    rq, rk, rv, lost = ref_attention(R, Q, K, V, 1.0, keep, bias.contiguous(), None)
    for a, b in ((got.R_Q[0], rq), (got.R_K[0], rk), (got.R_V[0], rv)):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert abs(float(got.absorbed[0]) - lost) < 1e-12 and lost > 1e-3  # the bias's share
    assert float(got.R_K[0][1, :, 4:].abs().sum()) == 0.0  # padded keys get nothing


def test_t5_explains_through_cross_attention_with_padding():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=2,
                                num_decoder_layers=2, num_heads=4,
                                relative_attention_num_buckets=8, decoder_start_token_id=0,
                                pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).double().eval()
    ids = torch.randint(1, 32, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    dec = torch.randint(1, 32, (2, 3), generator=torch.Generator().manual_seed(2))
    for mode in ("default", "contrastive"):
        with dlb.trace(model) as tape:
            model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
        exp = tape.explain(mode=mode)
        assert exp.conservation_error() < 1e-12 * 100
        assert float(exp.inputs["input_ids"][1, 4:].abs().sum()) == 0.0  # padding
        assert float(exp.inputs["input_ids"].abs().sum()) > 1.0  # through cross-attention
        biased = [k for k, v in exp.absorbed.items() if "attention_fn" in k
                  and (v if mode == "default" else 1.0) != 0.0]
        assert biased  # the position bias kept its share in the attention calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_exp_of_masked_scores_equals_exp_everywhere(dtype):
    """The attention rule skips exp where it underflows to 0 (masked scores) in the columns
    a mask may close: the same values as exp everywhere, whatever those columns, -inf,
    finfo.min and the subnormal range included."""
    from dlbhooks.rules.attention import _exp_spans_

    fi = torch.finfo(dtype)
    tiny = math.log(fi.smallest_normal * fi.eps)  # ln of the smallest subnormal
    x = torch.cat([torch.linspace(tiny - 3, 0, 4001, dtype=torch.float64),
                   torch.tensor([float("-inf"), -1e30, -800.0, tiny - 0.7, tiny - 0.69])])
    x = torch.cat([x.to(dtype), torch.tensor([fi.min], dtype=dtype)])
    x = x.view(1, 1, -1).expand(2, 3, -1).contiguous()
    want = x.exp()
    n = x.shape[-1]
    for a, b in [(0, n), (0, 0), (1000, 3000), (n - 7, n), (0, 5)]:
        assert torch.equal(_exp_spans_(x.clone(), a, b), want), (a, b)
    assert bool((want == 0).any()) and bool((want > 0).any())
