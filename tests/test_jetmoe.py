"""JetMoE: scattered MoE MLP and mixture-of-attention experts — conservation, unchanged
outputs, expert tensors, and agreement with slow per-token, per-expert references."""

import math

import pytest
import torch
import transformers as t
from helpers import assert_conserved

import dlbhooks as dlb
from dlbhooks.rules.attention import attention_relevance

H, E, K, KVH, D, I = 32, 4, 2, 2, 8, 16


def config(**kw):
    return t.JetMoeConfig(vocab_size=64, hidden_size=H, num_hidden_layers=2,
                          num_key_value_heads=KVH, kv_channels=D, intermediate_size=I,
                          max_position_embeddings=64, num_local_experts=E,
                          num_experts_per_tok=K, pad_token_id=0, **kw)


def build(cls="JetMoeForCausalLM", dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = getattr(t, cls)(config(**kw)).to(dtype).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 or "bias" in n:  # norms and the zero-initialised block biases
                p.add_(0.05 * torch.randn_like(p))
            elif "input_linear" in n or "output_linear" in n:
                p.mul_(20)  # initializer_range 0.01 makes the experts vanishingly small
    return model


IDS = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(3))


def _entry(exp, path):
    return next(e for e in exp.ledger if e.path == path)


def _net(v):
    return v[0] - v[1] if isinstance(v, tuple) else v


@pytest.mark.parametrize("cls", ["JetMoeForCausalLM", "JetMoeForSequenceClassification"])
def test_conserves_and_reports_experts(cls):
    model = build(cls)
    with dlb.trace(model) as tape:
        model(input_ids=IDS)
    for mode in ("default", "contrastive"):
        exp = tape.explain(mode=mode)
        assert_conserved(exp)
        want = {f"model.layers.{i}.{b}" for i in range(2)
                for b in ("mlp", "self_attention.experts")}
        assert set(exp.experts) == want and set(exp.routing) == want
        assert exp.total_input != 0
        for block, rel in exp.experts.items():
            assert rel.shape == (2, 6, E)
            assert exp.expert_columns(block) == [str(e) for e in range(E)]
            idx, w = exp.routing[block]
            assert idx.shape == (2, 6, K) and w.shape == (2, 6, K)
            # (the router's float32 softmax: measured 8.9e-8)
            assert torch.allclose(w.sum(-1), torch.ones(2, 6, dtype=w.dtype), rtol=0, atol=5e-7)
            chosen = torch.zeros(2, 6, E, dtype=torch.bool).scatter_(2, idx.long(), True)
            assert float(rel[~chosen].abs().sum()) == 0.0
            assert float(rel[chosen].abs().sum()) > 0
            # summing over experts gives the relevance that went through the experts
            total = _net(_entry(exp, f"{block}.output_linear").relevance_out)
            assert float(rel.sum()) == pytest.approx(total, rel=1e-12, abs=1e-12)
        # the attention went through the recorded attention call and its §4 rule
        assert set(exp.heads) == {f"model.layers.{i}.self_attention" for i in range(2)}


def test_outputs_unchanged_by_tracing():
    model = build(dtype=torch.float32)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=IDS, use_cache=False).logits
    with dlb.trace(model) as tape:
        got = model(input_ids=IDS).logits
    assert torch.equal(ref, got)
    assert model.config._attn_implementation == "eager"
    assert_conserved(tape.explain(), rtol=5e-7)  # float32: measured 1.2e-7


def test_padding_gets_exactly_zero_and_saturation_conserves():
    model = build("JetMoeForSequenceClassification")
    ids, mask = IDS.clone(), torch.ones(2, 6, dtype=torch.long)
    ids[0, :2] = 0  # left padding (pad_token_id 0)
    mask[0, :2] = 0
    pad = ~mask.bool()
    for mode in ("default", "contrastive"):
        exp = dlb.explain(model, {"input_ids": ids, "attention_mask": mask}, mode=mode,
                          saturation=True)
        assert_conserved(exp)
        streams = [exp.inputs] + ([exp.positive, exp.negative] if mode == "contrastive" else [])
        for rel in (s["input_ids"] for s in streams):
            assert bool((rel[pad] == 0).all()), (mode, rel)
        assert bool((exp.inputs["input_ids"][~pad] != 0).all())


# -- slow references ----------------------------------------------------------------------


def route(router_w, x):
    """Top-k of the router logits, softmax over the chosen ones (per token, in slot order;
    in float32, as JetMoE's router computes them)."""
    logits = (x @ router_w.T).float()
    top, idx = logits.topk(K, dim=-1)
    return idx, torch.softmax(top, dim=-1).to(x.dtype)


def slow_linear(share, x, W):
    """§2 through ``y = W x`` (no bias) for one row: share on y -> relevance on x."""
    Wl, xs, sh = W.tolist(), x.tolist(), share.tolist()
    R = [0.0] * len(xs)
    for j in range(len(Wl)):
        c = [Wl[j][i] * xs[i] for i in range(len(xs))]
        tot = sum(abs(v) for v in c)
        for i in range(len(xs)):
            R[i] += sh[j] * abs(c[i]) / tot if tot else 0.0
    return torch.tensor(R, dtype=x.dtype)


def slow_slots(R, terms, bias):
    """One token: R[h] split over the slot terms and the bias ∝ |term_h|; the bias keeps its
    share. Returns the share of each term."""
    shares = []
    for y in terms:
        s = torch.zeros_like(y)
        for h in range(y.shape[0]):
            den = sum(abs(float(z[h])) for z in terms) + abs(float(bias[h]))
            s[h] = float(R[h]) * abs(float(y[h])) / den if den else 0.0
        shares.append(s)
    return shares


def test_moe_mlp_matches_slow_reference():
    block = build().model.layers[0].mlp
    torch.manual_seed(1)
    x = torch.randn(1, 3, H, dtype=torch.float64)
    with dlb.trace(block) as tape:
        out = block(x)
    seed = torch.randn_like(out).abs()
    exp = tape.explain(target=seed, task="regression", saturation=False)
    assert_conserved(exp)
    Win, Wout = block.input_linear.weight.detach(), block.output_linear.weight.detach()
    bias, act = block.bias.detach(), block.activation
    xs, R = x.reshape(3, H), seed.reshape(3, H)
    idx, gates = route(block.router.layer.weight.detach(), xs)
    want = torch.zeros_like(xs)
    carried = torch.zeros(3, E, dtype=xs.dtype)
    for tok in range(3):
        experts = [int(e) for e in idx[tok]]
        terms = []
        for s, e in enumerate(experts):
            h = act(Win[e][:I] @ xs[tok]) * (Win[e][I:] @ xs[tok])
            terms.append(gates[tok, s] * (Wout[e] @ h))
        for e, share in zip(experts, slow_slots(R[tok], terms, bias)):
            carried[tok, e] += float(share.sum())
            h = act(Win[e][:I] @ xs[tok]) * (Win[e][I:] @ xs[tok])
            r_h = slow_linear(share, h, Wout[e])
            want[tok] += slow_linear(r_h / 2, xs[tok], Win[e][:I])  # product rule: halves
            want[tok] += slow_linear(r_h / 2, xs[tok], Win[e][I:])
    got = exp.inputs["layer_input"].reshape(3, H)
    # (measured 1.3e-15 and 3.6e-15, entries up to 3 and 16)
    assert torch.allclose(got, want, rtol=0, atol=1e-12), float((got - want).abs().max())
    assert torch.allclose(exp.experts["<root>"].reshape(3, E), carried, rtol=0, atol=1e-12)
    ridx, rw = exp.routing["<root>"]
    assert torch.equal(ridx.reshape(3, K), idx)
    assert torch.allclose(rw.reshape(3, K), gates, rtol=0, atol=1e-15)


def slow_rope(R, x, cos, sin):
    """``y_i = x_i c_i + rot(x)_i s_i`` with ``rot(x)_i = -x_{i+d/2}`` (i < d/2) or
    ``x_{i-d/2}``: each output's relevance split over its two contributions ∝ |.|."""
    out = torch.zeros_like(x)
    d = x.shape[-1]
    for b, h, s in torch.cartesian_prod(*(torch.arange(n) for n in x.shape[:3])).tolist():
        for i in range(d):
            j = (i + d // 2) % d
            a = float(x[b, h, s, i] * cos[s, i])
            c = float((-x[b, h, s, j] if i < d // 2 else x[b, h, s, j]) * sin[s, i])
            den = abs(a) + abs(c)
            if den:
                out[b, h, s, i] += float(R[b, h, s, i]) * abs(a) / den
                out[b, h, s, j] += float(R[b, h, s, i]) * abs(c) / den
    return out


def test_mixture_of_attention_matches_slow_reference():
    model = build()
    attn = model.model.layers[1].self_attention
    torch.manual_seed(4)
    S = 3
    x = torch.randn(1, S, H, dtype=torch.float64)
    pos = torch.arange(S)[None]
    cos, sin = model.model.rotary_emb(x, pos)
    mask = torch.triu(torch.full((S, S), torch.finfo(torch.float32).min, dtype=torch.float64),
                      1)[None, None]
    with dlb.trace(attn) as tape:
        out = attn(hidden_states=x, attention_mask=mask, position_embeddings=(cos, sin))[0]
    seed = torch.randn_like(out).abs()
    exp = tape.explain(target=seed, task="regression", saturation=False)
    assert_conserved(exp)

    moa = attn.experts
    Win, Wout = moa.input_linear.weight.detach(), moa.output_linear.weight.detach()
    Wkv, bias = attn.kv_proj.weight.detach(), moa.bias.detach()
    xs, R = x.reshape(S, H), seed.reshape(S, H)
    idx, gates = route(moa.router.layer.weight.detach(), xs)
    hd = KVH * D
    # the forward, per token and slot: queries of slot s are heads s·KVH .. s·KVH+KVH-1
    q_pre = torch.zeros(1, K * KVH, S, D, dtype=x.dtype)
    for tok in range(S):
        for s in range(K):
            q_pre[0, s * KVH:(s + 1) * KVH, tok] = (Win[int(idx[tok, s])] @ xs[tok]).view(KVH, D)
    kv = xs @ Wkv.T
    k_pre = kv[:, :hd].reshape(S, KVH, D).transpose(0, 1)[None]
    v = kv[:, hd:].reshape(S, KVH, D).transpose(0, 1)[None]
    c, sn = cos[0], sin[0]

    def rope(z):
        return z * c + torch.cat((-z[..., D // 2:], z[..., :D // 2]), -1) * sn

    q, k = rope(q_pre), rope(k_pre)
    k_rep, v_rep = k.repeat(1, K, 1, 1), v.repeat(1, K, 1, 1)
    scores = q @ k_rep.transpose(-1, -2) / math.sqrt(D) + mask
    probs = torch.softmax(scores, -1, dtype=torch.float32).double()  # eager's float32 softmax
    o = (probs @ v_rep).transpose(1, 2)[0]  # [S, K·KVH, D]
    # reduce: y_t = Σ_s g_ts · W_out[e] o_ts + bias
    want = torch.zeros_like(xs)
    carried = torch.zeros(S, E, dtype=x.dtype)
    R_o = torch.zeros(S, K * KVH, D, dtype=x.dtype)
    for tok in range(S):
        rows = [o[tok, s * KVH:(s + 1) * KVH].reshape(-1) for s in range(K)]
        terms = [gates[tok, s] * (Wout[int(idx[tok, s])] @ rows[s]) for s in range(K)]
        for s, share in enumerate(slow_slots(R[tok], terms, bias)):
            e = int(idx[tok, s])
            carried[tok, e] += float(share.sum())
            R_o[tok, s * KVH:(s + 1) * KVH] = slow_linear(share, rows[s], Wout[e]).view(KVH, D)
    # attention (§4, the tested rule) on the same repeated layout
    R_q, R_krep, R_vrep, _ = (r[0] for r in attention_relevance(  # one stream: [1, ...]
        R_o.transpose(0, 1)[None, None], q, k_rep, v_rep, scale=D ** -0.5, mask=mask))
    R_k = sum(R_krep[:, s * KVH:(s + 1) * KVH] for s in range(K))
    R_v = sum(R_vrep[:, s * KVH:(s + 1) * KVH] for s in range(K))
    R_qp, R_kp = slow_rope(R_q, q_pre, c, sn), slow_rope(R_k, k_pre, c, sn)
    R_kv = torch.cat((R_kp[0].transpose(0, 1).reshape(S, hd),
                      R_v[0].transpose(0, 1).reshape(S, hd)), -1)
    for tok in range(S):
        want[tok] += slow_linear(R_kv[tok], xs[tok], Wkv)
        for s in range(K):
            r = R_qp[0, s * KVH:(s + 1) * KVH, tok].reshape(-1)
            want[tok] += slow_linear(r, xs[tok], Win[int(idx[tok, s])])
    got = exp.inputs["hidden_states"].reshape(S, H)
    # (measured 4.4e-16 and 8.9e-16, entries up to 2 and 8)
    assert torch.allclose(got, want, rtol=0, atol=1e-12), float((got - want).abs().max())
    assert torch.allclose(exp.experts["experts"].reshape(S, E), carried, rtol=0, atol=1e-12)
    ridx, rw = exp.routing["experts"]
    assert torch.equal(ridx.reshape(S, K), idx)
    assert torch.allclose(rw.reshape(S, K), gates, rtol=0, atol=1e-15)
    # the recomputed forward is the module's
    assert torch.allclose(out.reshape(S, H), torch.stack(
        [sum(gates[tk, s] * (Wout[int(idx[tk, s])] @ o[tk, s * KVH:(s + 1) * KVH].reshape(-1))
             for s in range(K)) + bias for tk in range(S)]), rtol=0, atol=1e-14)


def test_expert_stats_over_jetmoe():
    model = build()
    exp = dlb.explain(model, {"input_ids": IDS})
    stats = dlb.ExpertStats().add(exp)
    assert set(stats.layers) == set(exp.experts)
    for layer in stats.layers:
        assert float(stats.layers[layer].routed.sum()) == 2 * 12


def test_saturation_on_the_gate_half():
    """transformers' SiLU saturates below -6 (as nn.SiLU): input_linear's gate units (first
    half) below it give their positive contributions nothing; conservation holds."""
    from dlbhooks.rules.elementwise import saturation_bounds

    block = build().model.layers[0].mlp
    x = 40 * torch.randn(1, 3, H, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with dlb.trace(block) as tape:
        out = block(x)
    gate_pre = next(r for r in tape.records if r.path == "input_linear").outputs[0][:, :I]
    assert bool((gate_pre < -6).any())
    seed = torch.randn_like(out).abs()
    assert saturation_bounds(block.activation) == (-6.0, None)
    plain = tape.explain(target=seed, task="regression", saturation=False)
    sat = tape.explain(target=seed, task="regression", saturation=True)
    assert_conserved(sat)
    # saturation changes the input relevance (measured by 5.3e-5) far beyond rounding ...
    assert (sat.inputs["layer_input"] - plain.inputs["layer_input"]).abs().max() > 1e-6
    # ... only through input_linear's rule: what reaches it is the same
    assert torch.equal(sat.at("activation"), plain.at("activation"))
    assert (sat.at("input_linear") - plain.at("input_linear")).abs().max() > 1e-6
