"""Mixture-of-experts: conservation through every family, agreement of the experts rule
with a slow per-token, per-expert reference, expert tensors, unchanged outputs."""

import pytest
import torch
import transformers
from helpers import assert_conserved

import dlbhooks as dlb

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def config(name):
    t = transformers
    if name == "qwen3_moe":
        return t.Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=48,
                                moe_intermediate_size=16, num_experts=4,
                                num_experts_per_tok=2, decoder_sparse_step=1)
    if name == "olmoe":
        return t.OlmoeConfig(**COMMON, intermediate_size=16, num_experts=4,
                             num_experts_per_tok=2)
    if name == "mixtral":
        return t.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=4,
                               num_experts_per_tok=2)
    if name == "qwen2_moe":
        return t.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=16,
                                shared_expert_intermediate_size=24, num_experts=4,
                                num_experts_per_tok=2)
    if name == "gpt_oss":
        return t.GptOssConfig(**COMMON, head_dim=8, intermediate_size=16, num_local_experts=4,
                              num_experts_per_tok=2, sliding_window=4,
                              rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    raise KeyError(name)


FAMILIES = ["qwen3_moe", "olmoe", "mixtral", "qwen2_moe", "gpt_oss"]


def build(name, dtype=torch.float64, experts="eager"):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config(name)).to(dtype).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 or "bias" in n or "sinks" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.set_experts_implementation(experts)
    return model


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
MASK = torch.tensor([[1] * 6, [0, 0] + [1] * 4])  # row 1 padded on the left


@pytest.mark.parametrize("name", FAMILIES)
def test_family_conserves_and_reports_experts(name):
    model = build(name)
    with dlb.trace(model) as tape:
        model(input_ids=IDS, attention_mask=MASK)
    pad = MASK == 0
    for mode in ("default", "contrastive"):
        exp = tape.explain(mode=mode)
        assert_conserved(exp)
        streams = [exp.inputs] + ([exp.positive, exp.negative] if mode == "contrastive" else [])
        for rel in (s["input_ids"] for s in streams):
            assert bool((rel[pad] == 0).all()), "padded positions get exactly 0"
        assert bool((exp.inputs["input_ids"][~pad] != 0).all())
        assert len(exp.experts) == 2 and len(exp.routing) == 2
        for block, rel in exp.experts.items():
            shared = name == "qwen2_moe"  # the shared expert is an extra last column
            assert rel.shape == (2, 6, 5 if shared else 4)
            names = exp.expert_columns(block)
            assert names == ["0", "1", "2", "3"] + (["shared"] if shared else [])
            idx, w = exp.routing[block]
            assert idx.shape == (2, 6, 2) and w.shape == (2, 6, 2)
            # experts not selected for a token carry nothing
            chosen = torch.zeros(2, 6, 4, dtype=torch.bool).scatter_(2, idx.long(), True)
            assert float(rel[..., :4][~chosen].abs().sum()) == 0.0
            assert bool((rel[pad] == 0).all())  # padded tokens' experts carry nothing
            # summing over the routed experts gives the relevance that went through them
            total = _net(_entry(exp, f"{block}.experts").relevance_out)
            assert float(rel[..., :4].sum()) == pytest.approx(total, rel=1e-12, abs=1e-12)
            if shared:
                # ... and over all columns, the relevance through the whole MoE block
                entry = _entry(exp, block)
                total = _net(entry.relevance_out) - _net(entry.absorbed)
                assert float(rel.sum()) == pytest.approx(total, rel=1e-12, abs=1e-12)
                sh = _net(_entry(exp, f"{block}.shared_expert").relevance_out)
                assert float(rel[..., 4].sum()) == pytest.approx(sh, rel=1e-12, abs=1e-12)
                assert float(rel[..., 4].abs().sum()) > 0


def _entry(exp, path):
    return next(e for e in exp.ledger if e.path == path)


def _net(v):
    return v[0] - v[1] if isinstance(v, tuple) else v


@pytest.mark.parametrize("experts", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_outputs_unchanged_by_tracing(name, experts):
    model = build(name, torch.float32, experts)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        ref = model(input_ids=IDS, use_cache=False).logits
    with dlb.trace(model) as tape:
        got = model(input_ids=IDS).logits
    assert torch.equal(ref, got)
    assert model.config._experts_implementation == experts
    # and it explains, whatever implementation ran (float32: measured <= 1.5e-7)
    assert_conserved(tape.explain(), rtol=1e-6)


def slow_experts(R, x, idx, w, Wgu, Wd, act, I):
    """Per token, per selected expert, per unit: METHOD.md §5 with explicit loops (default
    mode, no saturation, no biases)."""
    T = x.shape[0]
    R_x = torch.zeros_like(x)
    carried = torch.zeros(T, Wgu.shape[0], dtype=x.dtype)
    for tok in range(T):
        terms = []  # (column, contribution g·f(x), (W_gate, W_up, W_down))
        for s in range(idx.shape[1]):
            e = int(idx[tok, s])
            mats = (Wgu[e][:I], Wgu[e][I:], Wd[e])
            h = act(mats[0] @ x[tok]) * (mats[1] @ x[tok])
            terms.append((e, (mats[2] @ h) * w[tok, s], mats))
        slow_split_terms(R[tok], x[tok], terms, act, R_x[tok], carried[tok])
    return R_x, carried


def slow_split_terms(R_t, x_t, terms, act, R_x_t, carried_t) -> None:
    """One token: each unit's relevance split over the terms ∝ |contribution| (the add
    rule), each term's share through its MLP; adds to ``R_x_t`` and ``carried_t``."""
    H = x_t.shape[0]
    for col, y, mats in terms:
        share = torch.zeros(H, dtype=x_t.dtype)
        for hh in range(H):
            den = sum(abs(float(yy[hh])) for _, yy, _ in terms)
            share[hh] = float(R_t[hh]) * abs(float(y[hh])) / den if den else 0.0
        carried_t[col] += float(share.sum())
        R_x_t += slow_mlp(share, x_t, *mats, act)


def test_experts_rule_matches_slow_reference():
    model = build("qwen3_moe")
    block = model.model.layers[0].mlp
    torch.manual_seed(1)
    x = torch.randn(1, 3, 32, dtype=torch.float64)
    with dlb.trace(block) as tape:
        out = block(x)
    seed = torch.randn_like(out).abs()
    exp = tape.explain(target=seed, task="regression", saturation=False)
    rec = next(r for r in tape.records if r.path == "experts")
    x2, idx, w = rec.inputs
    E = block.experts
    I = E.gate_up_proj.shape[1] // 2
    want, carried = slow_experts(seed.reshape(3, 32), x2, idx, w, E.gate_up_proj.detach(),
                                 E.down_proj.detach(), E.act_fn, I)
    # (measured 6.7e-16 and 3.6e-15, entries of order 1 and 10)
    assert torch.allclose(exp.inputs["hidden_states"].reshape(3, 32), want, rtol=0, atol=1e-12)
    assert torch.allclose(exp.experts["<root>"].reshape(3, -1), carried, rtol=0, atol=1e-12)


def slow_mlp(share, x, W_gate, W_up, W_down, act):
    """Relevance on ``x`` of ``down(act(gate x) * up x)`` given relevance ``share`` on its
    output units: §2 through down (no bias), half to each factor, §2 through gate and up."""
    H, I = x.shape[0], W_gate.shape[0]
    h = (act(W_gate @ x) * (W_up @ x)).tolist()
    xs, Wg, Wu, Wdn, sh = x.tolist(), W_gate.tolist(), W_up.tolist(), W_down.tolist(), \
        share.tolist()
    r_h = [0.0] * I
    for hh in range(len(Wdn)):
        contrib = [Wdn[hh][j] * h[j] for j in range(I)]
        tot = sum(abs(c) for c in contrib)
        for j in range(I):
            r_h[j] += sh[hh] * abs(contrib[j]) / tot if tot else 0.0
    R_x = [0.0] * H
    for j in range(I):
        for W in (Wg, Wu):  # half to act(gate_j), half to up_j
            c_in = [W[j][i] * xs[i] for i in range(H)]
            t_in = sum(abs(c) for c in c_in)
            for i in range(H):
                R_x[i] += 0.5 * r_h[j] * abs(c_in[i]) / t_in if t_in else 0.0
    return torch.tensor(R_x, dtype=x.dtype)


def slow_shared_moe(R, x, idx, w, experts, shared, gate_w):
    """Per token and unit: R[t, h] split over the selected experts' g·E(x) and the gated shared
    expert σ(gate·x)·S(x) in one step ∝ |contribution| (METHOD.md §5), then through each MLP.
    Returns relevance on x and the relevance each column (experts..., shared) carried."""
    T = x.shape[0]
    Wgu, Wd, act = experts.gate_up_proj.detach(), experts.down_proj.detach(), experts.act_fn
    I, E = Wgu.shape[1] // 2, Wgu.shape[0]
    S = (shared.gate_proj.weight.detach(), shared.up_proj.weight.detach(),
         shared.down_proj.weight.detach())
    R_x = torch.zeros_like(x)
    carried = torch.zeros(T, E + 1, dtype=x.dtype)
    for t in range(T):
        terms = []  # (column, contribution g·f(x), (W_gate, W_up, W_down))
        for s in range(idx.shape[1]):
            e = int(idx[t, s])
            mats = (Wgu[e][:I], Wgu[e][I:], Wd[e])
            y = mats[2] @ (act(mats[0] @ x[t]) * (mats[1] @ x[t]))
            terms.append((e, w[t, s] * y, mats))
        y = S[2] @ (act(S[0] @ x[t]) * (S[1] @ x[t]))
        terms.append((E, torch.sigmoid(gate_w @ x[t])[0] * y, S))
        slow_split_terms(R[t], x[t], terms, act, R_x[t], carried[t])
    return R_x, carried


def test_shared_expert_block_matches_slow_reference():
    model = build("qwen2_moe")
    block = model.model.layers[1].mlp
    torch.manual_seed(2)
    x = torch.randn(1, 3, 32, dtype=torch.float64)
    with dlb.trace(block) as tape:
        out = block(x)
    seed = torch.randn_like(out).abs()
    exp = tape.explain(target=seed, task="regression", saturation=False)
    assert_conserved(exp)
    rec = next(r for r in tape.records if r.path == "experts")
    x2, idx, w = rec.inputs
    want, carried = slow_shared_moe(seed.reshape(3, 32), x2, idx, w, block.experts,
                                    block.shared_expert, block.shared_expert_gate.weight.detach())
    got = exp.inputs["hidden_states"].reshape(3, 32)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)  # (measured 6.7e-16)
    assert torch.allclose(exp.experts["<root>"].reshape(3, -1), carried, rtol=0, atol=1e-12)
    assert exp.expert_columns("<root>") == ["0", "1", "2", "3", "shared"]
    # one step, which differs from a two-stage split (|routed sum| vs |shared| first)
    routed = rec.outputs[0]
    gated = torch.sigmoid(next(r for r in tape.records if r.path == "shared_expert_gate")
                          .outputs[0]) * next(r for r in tape.records
                                              if r.path == "shared_expert").outputs[0]
    two_stage = seed.reshape(3, 32) * gated.abs() / (routed.abs() + gated.abs())
    assert not torch.allclose(two_stage.sum(-1), carried[:, -1], rtol=1e-3)


def test_expert_stats_accumulate_merge_save(tmp_path):
    model = build("qwen3_moe")
    exps = []
    for seed in range(3):
        ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(seed))
        exps.append(dlb.explain(model, {"input_ids": ids}))
    whole = dlb.ExpertStats()
    for e in exps:
        whole.add(e)
    a = dlb.ExpertStats().add(exps[0])
    b = dlb.ExpertStats().add(exps[1]).add(exps[2])
    merged = a.merge(b)
    for layer in whole.layers:
        assert torch.allclose(merged.layers[layer].abs_relevance,
                              whole.layers[layer].abs_relevance, rtol=1e-12, atol=0)
        assert torch.equal(merged.layers[layer].routed, whole.layers[layer].routed)
        # every token selects k=2 experts
        assert float(whole.layers[layer].routed.sum()) == 2 * whole.layers[layer].tokens == 60
        total = sum(float(e.experts[layer].sum()) for e in exps)
        assert float(whole.layers[layer].relevance.sum()) == pytest.approx(total, rel=1e-12)
        ranking = whole.ranking(layer)
        scores = whole.score(layer)
        assert sorted(ranking) == list(range(4))
        assert all(scores[ranking[i]] <= scores[ranking[i + 1]] for i in range(3))
    path = tmp_path / "stats.safetensors"
    whole.save(path)
    back = dlb.ExpertStats.load(path)
    assert back.explanations == 3
    for layer in whole.layers:
        assert torch.equal(back.layers[layer].weight, whole.layers[layer].weight)
    assert len(whole.least(0.5)["model.layers.0.mlp"]) == 2
    mask = torch.ones(2, 5)
    mask[0, :2] = 0
    partial = dlb.ExpertStats().add(exps[0], mask=mask)
    assert partial.layers["model.layers.0.mlp"].tokens == 8


def test_pruned_experts_are_never_routed_and_restored():
    from dlbhooks.analysis.pruning import pruned

    model = build("qwen3_moe")
    ref = model(input_ids=IDS).logits
    plan = {"model.layers.0.mlp": [0, 1], "model.layers.1.mlp": [3]}
    with pruned(model, plan):
        exp = dlb.explain(model, {"input_ids": IDS})
        changed = model(input_ids=IDS).logits
    for block, drop in plan.items():
        idx, _ = exp.routing[block]
        assert not bool(torch.isin(idx, torch.tensor(drop)).any())
        assert float(exp.experts[block][..., drop].abs().sum()) == 0.0
    assert not torch.equal(changed, ref)
    assert torch.equal(model(input_ids=IDS).logits, ref)
    with pytest.raises(ValueError):
        with pruned(model, {"model.layers.0.mlp": [0, 1, 2]}):
            pass


def test_expert_stats_keep_shared_experts_out_of_rankings(tmp_path):
    model = build("qwen2_moe")
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    exp = dlb.explain(model, {"input_ids": ids})
    stats = dlb.ExpertStats().add(exp)
    for layer, rel in exp.experts.items():
        st = stats.layers[layer]
        assert st.relevance.numel() == rel.shape[-1] - 1  # routed experts only
        assert set(stats.ranking(layer)) == set(range(rel.shape[-1] - 1))
        want = float(rel[..., -1].double().sum())
        assert abs(st.shared["shared"] - want) <= 1e-12 * max(1.0, abs(want))
        total = float(rel.double().sum())
        assert abs(float(st.relevance.sum()) + st.shared["shared"] - total) <= 1e-12 * abs(total)
    path = tmp_path / "s.safetensors"
    stats.save(path)
    back = dlb.ExpertStats.load(path)
    assert back.layers[layer].shared == stats.layers[layer].shared
    plan = stats.least(0.5)
    assert all(max(v) < rel.shape[-1] - 1 for v in plan.values())
