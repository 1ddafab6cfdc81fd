"""RoPE's relevance rule (rules/functional.py, ``Rope``) against a slow reference.

A tiny Llama attention module is explained alone. The relevance that reaches its input
is rebuilt here, element by element, from the relevance the attention call's Q, K and V
received: q_rot[d] = q[d]·cos[d] + rot(q)[d]·sin[d] (rot(q)[d] = -q[d+h] for d < h,
q[d-h] otherwise) is a two-term weighted sum without bias, split by METHOD.md §2; then
q_proj / k_proj / v_proj by §2 again. Both §2 references come from
tests/test_rules_reference.py, which shares no code with the package.
"""

from __future__ import annotations

import torch
from test_rules_reference import linear_units, ref_default
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRotaryEmbedding,
)

import dlbhooks as dlb

B, T, HEADS, KV, D = 1, 3, 2, 1, 4
H = HEADS * D


def rope_units(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Units of x_rot = x·cos + rot(x)·sin for x [b, h, t, d] (flattened), cos/sin [b, t, d]."""
    b, h, t, d = x.shape
    half = d // 2
    units = []
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                for di in range(d):
                    def idx(dd):
                        return ((bi * h + hi) * t + ti) * d + dd

                    c = float(cos[bi, ti, di])
                    s = float(sin[bi, ti, di])
                    if di < half:
                        other, sign = di + half, -1.0
                    else:
                        other, sign = di - half, 1.0
                    units.append([
                        (float(x[bi, hi, ti, di]) * c, [(0, idx(di), 1.0)]),
                        (sign * float(x[bi, hi, ti, other]) * s, [(0, idx(other), 1.0)]),
                    ])
    return units


def test_rope_and_projections_match_slow_reference():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV,
                      head_dim=D, intermediate_size=8, vocab_size=11)
    cfg._attn_implementation = "eager"
    attn = LlamaAttention(cfg, layer_idx=0).double().eval()
    rotary = LlamaRotaryEmbedding(cfg).double()
    x = torch.randn(B, T, H, dtype=torch.float64)
    pos = torch.arange(T)[None] * 5  # far apart: sin is not small
    cos, sin = rotary(x, pos)
    with dlb.trace(attn) as tape:
        out, _ = attn(x, (cos, sin), None)
    seed = torch.randn_like(out)
    exp = tape.explain(target=seed, task="regression", saturation=False)
    R_q, R_k, R_v = (r.reshape(-1).tolist() for r in exp.tensors["attention_fn"])

    def heads(y, n):  # projection output [b, t, n·d] -> [b, n, t, d]
        return y.view(B, T, n, D).transpose(1, 2)

    Wq, Wk, Wv = (m.weight.detach() for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    total = [0.0] * (B * T * H)
    for W, n, R_rot in ((Wq, HEADS, R_q), (Wk, KV, R_k), (Wv, KV, None)):
        pre = heads(x @ W.T, n)
        if R_rot is None:  # V: no RoPE
            R_pre = torch.tensor(R_v, dtype=torch.float64).view(B, n, T, D)
        else:
            units = rope_units(pre, cos, sin)
            got, lost, _ = ref_default(units, [0.0] * len(units), R_rot, [pre.numel()])
            assert abs(lost) < 1e-12
            R_pre = torch.tensor(got[0], dtype=torch.float64).view(B, n, T, D)
        R_proj_out = R_pre.transpose(1, 2).reshape(-1).tolist()  # [b, t, n·d]
        units, bias = linear_units(x, W, None)
        got, _, _ = ref_default(units, bias, R_proj_out, [x.numel()])
        total = [a + b for a, b in zip(total, got[0])]
    want = torch.tensor(total, dtype=torch.float64).view(B, T, H)
    got = exp.inputs["hidden_states"]
    # (measured 8.3e-17, entries up to 0.24)
    assert torch.allclose(got, want, rtol=0, atol=1e-13), (got - want).abs().max()
