"""Attention in transformers families against slow references written from METHOD.md.

Every reference below loops over heads, queries, keys, units and contributions, in float64,
on tiny random models: §4 with Gemma-2's logit soft-capping, RoPE (§3) on a partial rotary
dimension (Phi-3) and in contrastive mode, GPT-2's ``Conv1D`` (§2, weights [in, out]), and
the values of ``exp.heads`` and ``exp.blocks``. The §2 unit references come from
tests/test_rules_reference.py, which shares no code with the package. Also: contrastive
conservation through GPT-OSS (attention sinks, RoPE) and traced logits equal to eager
attention's bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from test_rules_reference import linear_units, ref_contrastive, ref_default

import dlbhooks as dlb
from dlbhooks.rules.functional import rope_relevance

D = torch.float64
RTOL = 1e-9


def close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = RTOL) -> float:
    """Element-wise agreement to ``rtol`` of the largest reference value."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    err = float((got.to(D) - want).abs().max())
    scale = float(want.abs().max())
    assert scale > 0, f"{what}: the reference is all zeros"
    assert err <= rtol * scale, f"{what}: max error {err:.3e}, scale {scale:.3e}"
    return err / scale


def init_(module: torch.nn.Module, seed: int, std: float = 0.5) -> torch.nn.Module:
    """Every parameter ~ N(0, std²): biases and norm weights non-trivial, scores O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=D) * std)
    return module.to(D).eval()


def records(tape) -> dict:
    return {r.path: r for r in tape.records}


# -- references -------------------------------------------------------------------------


def ref_linear(R: torch.Tensor, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None):
    """§2 (default mode, no saturation) through ``x @ W.T + b``: (relevance on x, bias share)."""
    units, bias = linear_units(x.detach(), W.detach(), None if b is None else b.detach())
    out, absorbed, _ = ref_default(units, bias, R.reshape(-1).tolist(), [x.numel()])
    return torch.tensor(out[0], dtype=D).reshape(x.shape), absorbed


def rope_units(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Units of ``x·cos + rotate_half(x)·sin`` over the last dim of x [..., r] (cos / sin
    broadcast to x): unit k has ``x_k·cos_k`` and ``-x_{k+r/2}·sin_k`` (k < r/2) or
    ``x_{k-r/2}·sin_k`` (k >= r/2)."""
    r = x.shape[-1]
    xs = x.reshape(-1, r).tolist()
    cs = cos.expand(x.shape).reshape(-1, r).tolist()
    ss = sin.expand(x.shape).reshape(-1, r).tolist()
    units = []
    for row in range(len(xs)):
        for k in range(r):
            other, sign = (k + r // 2, -1.0) if k < r // 2 else (k - r // 2, 1.0)
            units.append([(xs[row][k] * cs[row][k], [(0, row * r + k, 1.0)]),
                          (sign * xs[row][other] * ss[row][k], [(0, row * r + other, 1.0)])])
    return units


def ref_rope(R: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """§2 on RoPE's two-term units over the first ``cos.shape[-1]`` dims of x [B, H, T, d]
    (cos / sin [B, T, r]); the other dims pass their relevance unchanged."""
    r = cos.shape[-1]
    xr = x[..., :r]
    units = rope_units(xr, cos[:, None], sin[:, None])
    got, lost, _ = ref_default(units, [0.0] * len(units), R[..., :r].reshape(-1).tolist(),
                               [xr.numel()])
    assert abs(lost) < 1e-12
    return torch.cat((torch.tensor(got[0], dtype=D).reshape(xr.shape), R[..., r:]), dim=-1)


def ref_attention(R_O, Q, K, V, scale: float, keep, softcap: float | None = None):
    """§4 per head h, query i, key j and dims, literally. Q [B, H, T, d]; K, V [B, Hkv, T, d]
    (query head h reads key/value head h // (H / Hkv)); keep [B, T, T] bool; R_O like Q.
    Scores ``s = scale·q·k``, with soft-capping ``cap·tanh(s / cap)``: an element-wise map
    of the score, so the score's relevance is split over q·k's products as without it.
    Returns (R_Q, R_K, R_V, A)."""
    B, H, T, d = Q.shape
    Hkv, dv = K.shape[1], V.shape[-1]
    q, k, v, r, kp = Q.tolist(), K.tolist(), V.tolist(), R_O.tolist(), keep.tolist()
    RQ = [[[[0.0] * d for _ in range(T)] for _ in range(H)] for _ in range(B)]
    RK = [[[[0.0] * d for _ in range(T)] for _ in range(Hkv)] for _ in range(B)]
    RV = [[[[0.0] * dv for _ in range(T)] for _ in range(Hkv)] for _ in range(B)]
    A = torch.zeros(B, H, T, T, dtype=D)
    for b in range(B):
        for h in range(H):
            kh = h // (H // Hkv)
            for i in range(T):
                logits = {}
                for j in range(T):
                    if kp[b][i][j]:
                        s = scale * sum(q[b][h][i][e] * k[b][kh][j][e] for e in range(d))
                        logits[j] = softcap * math.tanh(s / softcap) if softcap else s
                mx = max(logits.values())
                Z = sum(math.exp(s - mx) for s in logits.values())
                a = {j: math.exp(s - mx) / Z for j, s in logits.items()}
                for j, p in a.items():
                    A[b, h, i, j] = p
                RA = dict.fromkeys(a, 0.0)
                for dd in range(dv):  # O_id = Σ_j A_ij V_jd: pairs ∝ |A_ij V_jd|, half each
                    den = sum(a[j] * abs(v[b][kh][j][dd]) for j in a)
                    for j in a:
                        share = r[b][h][i][dd] * a[j] * abs(v[b][kh][j][dd]) / den
                        RA[j] += share / 2
                        RV[b][kh][j][dd] += share / 2
                for j in a:  # S_ij = Σ_e Q_ie K_je: pairs ∝ |Q_ie K_je|, half each
                    den = sum(abs(q[b][h][i][e] * k[b][kh][j][e]) for e in range(d))
                    for e in range(d):
                        share = RA[j] * abs(q[b][h][i][e] * k[b][kh][j][e]) / den
                        RQ[b][h][i][e] += share / 2
                        RK[b][kh][j][e] += share / 2
    t = lambda x: torch.tensor(x, dtype=D)  # noqa: E731
    return t(RQ), t(RK), t(RV), A


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE forward on the first ``cos.shape[-1]`` dims of x [B, H, T, d]."""
    r = cos.shape[-1]
    c, s, xr = cos[:, None], sin[:, None], x[..., :r]
    rot = torch.cat((-xr[..., r // 2:], xr[..., : r // 2]), dim=-1)
    return torch.cat((xr * c + rot * s, x[..., r:]), dim=-1)


def ref_attention_module(R_y, x, o_in, W: dict, heads: tuple[int, int, int], cos, sin,
                         keep, scale: float, softcap: float | None = None) -> dict:
    """A Llama-like attention module, from the relevance ``R_y`` of its output back to its
    input ``x`` [B, T, hidden]: o_proj (§2, on its recorded input ``o_in``) -> §4 per head ->
    RoPE (§3) -> q/k/v projections (§2). ``W``: {"q", "k", "v", "o"} -> (weight, bias)."""
    H, Hkv, d = heads
    B, T, _ = x.shape
    split = lambda y, n: y.reshape(B, T, n, d).transpose(1, 2)  # noqa: E731
    merge = lambda y: y.transpose(1, 2).reshape(B, T, -1)  # noqa: E731
    pre = {n: split(x @ W[n][0].T + (0 if W[n][1] is None else W[n][1]), m)
           for n, m in (("q", H), ("k", Hkv), ("v", Hkv))}
    Q, K = rotate(pre["q"], cos, sin), rotate(pre["k"], cos, sin)
    R_o_in, _ = ref_linear(R_y, o_in, *W["o"])
    R_Q, R_K, R_V, A = ref_attention(split(R_o_in, H), Q, K, pre["v"], scale, keep, softcap)
    R_x = torch.zeros_like(x)
    for n, R in (("q", ref_rope(R_Q, pre["q"], cos, sin)), ("k", ref_rope(R_K, pre["k"], cos, sin)),
                 ("v", R_V)):
        R_x += ref_linear(merge(R), x, *W[n])[0]
    heads_rel = R_o_in.reshape(B, T, H, d).sum(dim=(1, 3))
    return {"R_x": R_x, "R_Q": R_Q, "R_K": R_K, "R_V": R_V, "A": A, "heads": heads_rel}


def ref_add(R: torch.Tensor, terms: list[torch.Tensor]) -> list[torch.Tensor]:
    """The add rule element by element: term t gets R·|t| / Σ|terms| (same shapes)."""
    flat = [t.reshape(-1).tolist() for t in terms]
    out = [[0.0] * len(flat[0]) for _ in terms]
    for e, r in enumerate(R.reshape(-1).tolist()):
        den = sum(abs(f[e]) for f in flat)
        for n, f in enumerate(flat):
            out[n][e] = r * abs(f[e]) / den if den else 0.0
    return [torch.tensor(o, dtype=D).reshape(R.shape) for o in out]


def masks(B: int, T: int):
    """Causal attention, and right padding in the last row (its last key is closed):
    (keep [B, T, T] bool, additive mask [B, 1, T, T])."""
    keep = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T).clone()
    keep[-1, :, -1] = False
    mask = torch.zeros(B, 1, T, T, dtype=D).masked_fill(~keep[:, None], torch.finfo(D).min)
    return keep, mask


# -- Gemma-2: soft-capped attention logits ------------------------------------------------


def test_gemma2_softcapped_attention_matches_reference():
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2RotaryEmbedding

    B, T, HID, H, KV, d, cap = 2, 4, 8, 2, 1, 4, 1.0
    cfg = transformers.Gemma2Config(
        hidden_size=HID, num_attention_heads=H, num_key_value_heads=KV, head_dim=d,
        intermediate_size=8, vocab_size=11, query_pre_attn_scalar=3, attention_bias=True,
        attn_logit_softcapping=cap, sliding_window=16)
    cfg._attn_implementation = "eager"
    attn = init_(Gemma2Attention(cfg, layer_idx=0), seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, HID, generator=g, dtype=D)
    cos, sin = Gemma2RotaryEmbedding(cfg).to(D)(x, torch.arange(T)[None].expand(B, T) * 5)
    keep, mask = masks(B, T)
    with dlb.trace(attn) as tape:
        out, _ = attn(x, (cos, sin), mask)
    seed = torch.randn(out.shape, generator=g, dtype=D)
    exp = tape.explain(target=seed, task="regression", saturation=False)

    W = {n: (getattr(attn, f"{n}_proj").weight.detach(), getattr(attn, f"{n}_proj").bias.detach())
         for n in "qkvo"}
    o_in = records(tape)["o_proj"].inputs[0]
    ref = ref_attention_module(seed, x, o_in, W, (H, KV, d), cos, sin, keep, 3 ** -0.5, cap)
    for n, got in zip(("R_Q", "R_K", "R_V"), exp.tensors["attention_fn"]):
        close(got, ref[n], n)
    close(exp.inputs["hidden_states"], ref["R_x"], "hidden_states")
    (heads,) = exp.heads.values()
    close(heads, ref["heads"], "heads")

    # the cap changes the softmax, and a rule that ignored it would fail the comparison
    plain = ref_attention_module(seed, x, o_in, W, (H, KV, d), cos, sin, keep, 3 ** -0.5)
    assert float((plain["A"] - ref["A"]).abs().max()) > 0.05
    assert float((plain["R_x"] - ref["R_x"]).abs().max()) > 1e-3 * float(ref["R_x"].abs().max())


# -- Phi-3: partial rotary embedding, fused qkv projection -----------------------------------


def test_phi3_partial_rope_matches_reference():
    from transformers.models.phi3.modeling_phi3 import Phi3Attention, Phi3RotaryEmbedding

    B, T, HID, H, KV = 2, 4, 8, 2, 1
    d = HID // H
    cfg = transformers.Phi3Config(
        hidden_size=HID, num_attention_heads=H, num_key_value_heads=KV, intermediate_size=8,
        vocab_size=11, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                        "partial_rotary_factor": 0.5})
    cfg._attn_implementation = "eager"
    attn = init_(Phi3Attention(cfg, layer_idx=0), seed=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, HID, generator=g, dtype=D)
    cos, sin = Phi3RotaryEmbedding(cfg).to(D)(x, torch.arange(T)[None].expand(B, T) * 5)
    assert cos.shape[-1] == d // 2  # half of each head rotates, the rest passes
    keep, mask = masks(B, T)
    with dlb.trace(attn) as tape:
        out, _ = attn(x, (cos, sin), mask)
    seed = torch.randn(out.shape, generator=g, dtype=D)
    exp = tape.explain(target=seed, task="regression", saturation=False)

    Wq, Wk, Wv = attn.qkv_proj.weight.detach().split([H * d, KV * d, KV * d])
    W = {"q": (Wq, None), "k": (Wk, None), "v": (Wv, None),
         "o": (attn.o_proj.weight.detach(), None)}
    o_in = records(tape)["o_proj"].inputs[0]
    ref = ref_attention_module(seed, x, o_in, W, (H, KV, d), cos, sin, keep, d ** -0.5)
    for n, got in zip(("R_Q", "R_K", "R_V"), exp.tensors["attention_fn"]):
        close(got, ref[n], n)
    close(exp.inputs["hidden_states"], ref["R_x"], "hidden_states")
    (heads,) = exp.heads.values()
    close(heads, ref["heads"], "heads")


# -- GPT-2's Conv1D: y = x @ W + b with W [in, out] --------------------------------------------


@pytest.mark.parametrize("mode", ["default", "contrastive"])
@pytest.mark.parametrize("nx,nf", [(6, 18), (12, 5)])  # c_attn-like (out = 3·in), and out < in
def test_conv1d_alone_matches_reference(nx, nf, mode):
    from transformers.pytorch_utils import Conv1D

    m = init_(Conv1D(nf, nx), seed=nx)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, nx, generator=g, dtype=D)
    with dlb.trace(m) as tape:
        y = m(x)
    seed = torch.randn(y.shape, generator=g, dtype=D)
    exp = tape.explain(target=seed, task="regression", mode=mode, saturation=False)
    units, bias = linear_units(x, m.weight.detach().T, m.bias.detach())
    if mode == "default":
        want, absorbed, _ = ref_default(units, bias, seed.reshape(-1).tolist(), [x.numel()])
        close(exp.inputs["x"], torch.tensor(want[0], dtype=D).view(x.shape), "x")
        assert exp.absorbed["<root>"] == pytest.approx(absorbed, rel=1e-12)
    else:
        pos, neg, lost, cases = ref_contrastive(
            units, bias, seed.clamp_min(0).reshape(-1).tolist(),
            (-seed).clamp_min(0).reshape(-1).tolist(), [x.numel()])
        assert cases["aligned"] and cases["crossed"] and lost == (0.0, 0.0)
        close(exp.positive["x"], torch.tensor(pos[0], dtype=D).view(x.shape), "x (+)")
        close(exp.negative["x"], torch.tensor(neg[0], dtype=D).view(x.shape), "x (-)")


def test_gpt2_conv1d_layers_in_the_model_match_reference():
    """Each Conv1D of a GPT-2 block, given the relevance its output received: c_attn
    [hidden, 3·hidden], attn.c_proj, c_fc [hidden, 4·hidden], mlp.c_proj [4·hidden, hidden]."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2, n_positions=16)
    model = init_(transformers.GPT2LMHeadModel(cfg), seed=5, std=0.3)
    ids = torch.randint(0, 32, (2, 4), generator=torch.Generator().manual_seed(6))
    with dlb.trace(model) as tape:
        model(input_ids=ids)
    exp = tape.explain(saturation=False)
    rec = records(tape)
    p = "transformer.h.0"
    B, T = ids.shape
    merge = lambda r: r.transpose(1, 2).reshape(B, T, -1)  # noqa: E731
    out_rel = {  # relevance on each Conv1D's output = what its consumer's input received
        "attn.c_attn": torch.cat([merge(r) for r in exp.tensors[f"{p}.attn.attention_fn"]], -1),
        "attn.c_proj": exp.at(f"{p}.attn.resid_dropout"),
        "mlp.c_fc": exp.at(f"{p}.mlp.act"),
        "mlp.c_proj": exp.at(f"{p}.mlp.dropout"),
    }
    for name, R in out_rel.items():
        m = rec[f"{p}.{name}"]
        W, b = m.module.weight.detach(), m.module.bias.detach()
        assert R.shape[-1] == W.shape[1]
        want, _ = ref_linear(R, m.inputs[0], W.T, b)
        close(exp.at(f"{p}.{name}"), want, name)
    assert rec[f"{p}.attn.c_attn"].module.weight.shape == (8, 24)
    assert rec[f"{p}.mlp.c_fc"].module.weight.shape == (8, 32)


# -- exp.blocks and exp.heads: values --------------------------------------------------------


def test_llama_layer_blocks_and_heads_match_reference():
    """A decoder layer ``h = x + attn(norm1(x))``, ``y = h + mlp(norm2(h))`` explained from
    a seed on y. Reference: the add rule on each residual add (blocks: "mlp" and
    "attention" are the branch shares, "residual" the skip shares of both adds), the MLP
    by §2 and the product rule (RMSNorms pass relevance element-wise), and the attention
    module as above; heads = relevance on each head's slice of the o_proj input."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    B, T, HID, H, KV = 2, 4, 8, 4, 2
    d = HID // H
    cfg = transformers.LlamaConfig(hidden_size=HID, num_attention_heads=H, num_key_value_heads=KV,
                                   intermediate_size=6, vocab_size=11, attention_bias=True,
                                   mlp_bias=True)
    cfg._attn_implementation = "eager"
    layer = init_(LlamaDecoderLayer(cfg, layer_idx=0), seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(B, T, HID, generator=g, dtype=D)
    cos, sin = LlamaRotaryEmbedding(cfg).to(D)(x, torch.arange(T)[None].expand(B, T) * 5)
    keep, mask = masks(B, T)
    with dlb.trace(layer) as tape:
        y = layer(x, attention_mask=mask, position_embeddings=(cos, sin))
    seed = torch.randn(y.shape, generator=g, dtype=D)
    exp = tape.explain(target=seed, task="regression", saturation=False)
    rec = records(tape)

    a, m = rec["self_attn"].outputs[0], rec["mlp"].outputs[0]
    h = x + a
    R_h_skip, R_m = ref_add(seed, [h, m])
    # MLP: down(act(gate(n)) * up(n)), n = norm2(h)
    mlp, n = layer.mlp, rec["post_attention_layernorm"].outputs[0]
    R_prod, _ = ref_linear(R_m, rec["mlp.down_proj"].inputs[0], mlp.down_proj.weight,
                           mlp.down_proj.bias)
    R_n = sum(ref_linear(R_prod / 2, n, lin.weight, lin.bias)[0]
              for lin in (mlp.gate_proj, mlp.up_proj))
    R_x_skip, R_a = ref_add(R_h_skip + R_n, [x, a])
    blocks = exp.blocks["<root>"]
    assert set(blocks) == {"attention", "mlp", "residual"}
    scale = float(seed.abs().sum())
    assert blocks["mlp"] == pytest.approx(float(R_m.sum()), abs=RTOL * scale)
    assert blocks["attention"] == pytest.approx(float(R_a.sum()), abs=RTOL * scale)
    assert blocks["residual"] == pytest.approx(float(R_h_skip.sum() + R_x_skip.sum()),
                                               abs=RTOL * scale)

    at = layer.self_attn
    W = {n_: (getattr(at, f"{n_}_proj").weight.detach(), getattr(at, f"{n_}_proj").bias.detach())
         for n_ in "qkvo"}
    ref = ref_attention_module(R_a, rec["input_layernorm"].outputs[0],
                               rec["self_attn.o_proj"].inputs[0], W, (H, KV, d), cos, sin,
                               keep, d ** -0.5)
    heads = exp.heads["self_attn"]
    assert heads.shape == (B, H)
    close(heads, ref["heads"], "heads")
    close(exp.inputs["hidden_states"], R_x_skip + ref["R_x"], "hidden_states")


def test_heads_are_the_o_proj_input_per_head_in_a_model():
    """In a whole model, both modes: heads[b, h] is the relevance on head h's slice of the
    o_proj input (the [batch, tokens, heads·head_dim] layout, not heads·tokens)."""
    cfg = transformers.LlamaConfig(hidden_size=8, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=6, vocab_size=16, num_hidden_layers=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(D).eval()
    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(9))
    with dlb.trace(model) as tape:
        model(input_ids=ids)
    for mode in ("default", "contrastive"):
        exp = tape.explain(mode=mode)
        for layer in ("model.layers.0", "model.layers.1"):
            o_in = exp.at(f"{layer}.self_attn.o_proj")
            want = o_in.reshape(2, 5, 4, 2).sum(dim=(1, 3))
            close(exp.heads[f"{layer}.self_attn"], want, f"{mode} {layer}", rtol=1e-12)


# -- RoPE in contrastive mode: per-stream conservation (GPT-OSS and every RoPE family) -------


def test_rope_contrastive_matches_reference_with_small_angles():
    """RoPE's units are two-term weighted sums; where sin (or cos) is small, one side of a
    unit is tiny, and P, N taken from |A|+|B| and A+B would lose its precision."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 5, 8, generator=g, dtype=D)
    angle = torch.logspace(-9, 0, 4, dtype=D).repeat(2) * torch.arange(1, 6, dtype=D)[:, None]
    c, s = angle.cos()[None, None], angle.sin()[None, None]  # [1, 1, T, d]
    Rp = torch.rand(x.shape, generator=g, dtype=D)
    Rn = torch.rand(x.shape, generator=g, dtype=D)
    got, absorbed = rope_relevance(torch.stack((Rp, Rn)), x, c, s)
    for r, out in ((Rp, got[0]), (Rn, got[1])):
        assert abs(float(out.sum() - r.sum())) <= 1e-13 * float(r.sum())
    units = rope_units(x, c, s)
    pos, neg, lost, cases = ref_contrastive(units, [0.0] * len(units), Rp.reshape(-1).tolist(),
                                            Rn.reshape(-1).tolist(), [x.numel()])
    assert cases["aligned"] and cases["crossed"] and lost == (0.0, 0.0)
    close(got[0], torch.tensor(pos[0], dtype=D).view(x.shape), "+ stream")
    close(got[1], torch.tensor(neg[0], dtype=D).view(x.shape), "- stream")


def _gpt_oss(theta: float, dtype: torch.dtype):
    cfg = transformers.GptOssConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, head_dim=8, intermediate_size=16,
        num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        rope_parameters={"rope_type": "default", "rope_theta": theta})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "bias" in name or "sinks" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.set_experts_implementation("eager")
    return model


# measured: float64 <= 2.5e-16, float32 <= 1.5e-7 (with P, N of RoPE's units taken from
# |A| + |B| and A + B: 5.5e-14 / 2.4e-13 / 1.6e-10 in float64 and 1.9e-6 / 9.5e-6 in float32,
# larger with larger rope_theta, i.e. smaller angles)
@pytest.mark.parametrize("theta,dtype,bound", [
    (1e4, torch.float64, 1e-14), (5e5, torch.float64, 1e-14), (1e10, torch.float64, 1e-14),
    (5e5, torch.float32, 5e-7), (1e10, torch.float32, 5e-7)])
def test_gpt_oss_contrastive_conserves(theta, dtype, bound):
    model = _gpt_oss(theta, dtype)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with dlb.trace(model) as tape:
        model(input_ids=ids)
    exp = tape.explain(mode="contrastive")
    assert exp.conservation_error() <= bound
    # the sinks take a share of both streams, absorbed by the attention calls
    sinks = [e.absorbed for e in exp.ledger if "attention_fn" in e.key]
    assert len(sinks) == 2 and all(p > 0 and n > 0 for p, n in sinks)


# -- traced logits = eager attention's logits, bit for bit ---------------------------------------


def _eager_and_traced(model, impl: str = "eager", **kw):
    """The logits of ``model`` set to ``impl``, untraced and traced."""
    model.set_attn_implementation(impl)
    with torch.no_grad():
        eager = model(**kw, use_cache=False).logits
    with dlb.trace(model):
        traced = model(**kw).logits
    return eager, traced


def _families():
    import test_moe
    import test_transformers as tt

    out = [(n, "AutoModelForCausalLM") for n in tt.DECODERS]
    out += [(n, "AutoModelForMaskedLM") for n in tt.ENCODERS]
    return out + [(n, "moe") for n in test_moe.FAMILIES]


def _build(name: str, head: str, dtype: torch.dtype):
    import test_moe
    import test_transformers as tt

    if head == "moe":
        ids, mask = tt.batch("llama")
        return test_moe.build(name, dtype), ids, mask
    ids, mask = tt.batch(name)
    return tt.build(name, head).to(dtype), ids, mask


#: families whose eager softmax runs in float32: in float64, a query row that attends to
#: nothing (a left-padded position) has float64's min as mask, -inf in float32, and eager
#: gives it NaN, which the next layer spreads over the whole padded sequence; dlbhooks
#: clamps the mask to float32's min, so its logits stay finite there (the other sequences
#: are equal bit for bit)
UPCAST_SOFTMAX = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
                  "qwen3_moe", "olmoe", "mixtral", "qwen2_moe"}


@pytest.mark.parametrize("name,head", _families(), ids=[n for n, _ in _families()])
def test_traced_logits_equal_eager_bit_for_bit(name, head):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        model, ids, mask = _build(name, head, dtype)
        eager, traced = _eager_and_traced(model, input_ids=ids, attention_mask=mask)
        if dtype == torch.float64 and name in UPCAST_SOFTMAX:
            padded = ~mask.bool().all(-1)
            assert torch.isnan(eager[padded]).all() and torch.isfinite(traced).all()
            assert torch.equal(traced[~padded], eager[~padded])
        else:
            assert torch.equal(traced, eager), f"{name} {dtype}"
        if getattr(model, "_supports_sdpa", False):  # a model set to sdpa: its own sdpa,
            # with the mask as an additive float mask (transformers' sdpa mask is boolean
            # or none at all, a causal flag): equal to rounding on the unpadded rows
            own, traced = _eager_and_traced(model, "sdpa", input_ids=ids, attention_mask=mask)
            rows = mask.bool().all(-1)
            tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float64: 1e-12}[dtype]
            torch.testing.assert_close(traced[rows], own[rows], rtol=tol, atol=tol,
                                       msg=f"{name} {dtype} sdpa")
            _, eager_traced = _eager_and_traced(model, "eager", input_ids=ids,
                                                attention_mask=mask)
            if dtype != torch.float64:  # (float64: eager's float32 softmax differs more)
                torch.testing.assert_close(traced[rows], eager_traced[rows], rtol=tol,
                                           atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpt2_reorder_and_upcast_attn_bit_for_bit(dtype):
    """GPT-2's ``reorder_and_upcast_attn``: eager runs the module's own float32 attention,
    not ``eager_attention_forward``; the recorded call must run the same."""
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  reorder_and_upcast_attn=True,
                                  scale_attn_by_inverse_layer_idx=True)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(dtype).eval()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    eager, traced = _eager_and_traced(model, input_ids=ids, attention_mask=mask)
    assert torch.equal(traced, eager)
    if dtype == torch.float32:
        with dlb.trace(model) as tape:
            model(input_ids=ids, attention_mask=mask)
        assert tape.explain().conservation_error() < 1e-6
