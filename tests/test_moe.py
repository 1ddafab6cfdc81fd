"""Mixture-of-experts: conservation through every family, agreement of the experts rule
with a slow per-token, per-expert reference, expert tensors, unchanged outputs."""

import pytest
import torch
from helpers import assert_conserved

import dlbhooks as dlb

t = pytest.importorskip("transformers")

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def config(name):
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
    model = t.AutoModelForCausalLM.from_config(config(name)).to(dtype).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1 or "bias" in n or "sinks" in n:
                p.add_(0.05 * torch.randn_like(p))
    model.set_experts_implementation(experts)
    return model


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", FAMILIES)
def test_family_conserves_and_reports_experts(name):
    model = build(name)
    with dlb.trace(model) as tape:
        model(input_ids=IDS)
    for mode in ("default", "contrastive"):
        exp = tape.explain(mode=mode)
        assert_conserved(exp)
        assert len(exp.experts) == 2 and len(exp.routing) == 2
        for block, rel in exp.experts.items():
            assert rel.shape == (2, 6, 4)
            idx, w = exp.routing[block]
            assert idx.shape == (2, 6, 2) and w.shape == (2, 6, 2)
            # experts not selected for a token carry nothing
            chosen = torch.zeros(2, 6, 4, dtype=torch.bool).scatter_(2, idx.long(), True)
            assert float(rel[~chosen].abs().sum()) == 0.0
            # summing over experts gives the relevance that went through the experts
            entry = next(e for e in exp.ledger if e.path == f"{block}.experts")
            out = entry.relevance_out
            total = out[0] - out[1] if isinstance(out, tuple) else out
            assert float(rel.sum()) == pytest.approx(total, rel=1e-9, abs=1e-9)


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
    tape.explain()  # and it explains, whatever implementation ran


def slow_experts(R, x, idx, w, Wgu, Wd, act, I):
    """Per token, per selected expert, per unit: METHOD.md §5 with explicit loops (default
    mode, no saturation, no biases)."""
    T, H = x.shape
    k = idx.shape[1]
    R_x = torch.zeros_like(x)
    carried = torch.zeros(T, Wgu.shape[0], dtype=x.dtype)
    for tok in range(T):
        outs = []
        for s in range(k):
            e = int(idx[tok, s])
            gu = Wgu[e] @ x[tok]
            gate, up = gu[:I], gu[I:]
            h = act(gate) * up
            o = Wd[e] @ h
            outs.append((e, gu, h, o * w[tok, s]))
        for hh in range(H):
            den = sum(abs(float(y[hh])) for *_, y in outs)
            for e, _gu, h, y in outs:
                share = float(R[tok, hh]) * abs(float(y[hh])) / den if den else 0.0
                carried[tok, e] += share
                # down_proj unit hh: contributions Wd[e][hh, j] * h[j]
                contrib = [float(Wd[e][hh, j] * h[j]) for j in range(I)]
                tot = sum(abs(c) for c in contrib)
                for j in range(I):
                    r_h = share * abs(contrib[j]) / tot if tot else 0.0
                    for unit in (j, I + j):  # half to act(gate_j), half to up_j
                        c_in = [float(Wgu[e][unit, i] * x[tok, i]) for i in range(H)]
                        t_in = sum(abs(c) for c in c_in)
                        for i in range(H):
                            R_x[tok, i] += 0.5 * r_h * abs(c_in[i]) / t_in if t_in else 0.0
    return R_x, carried


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
    assert torch.allclose(exp.inputs["hidden_states"].reshape(3, 32), want, rtol=1e-9,
                          atol=1e-10)
    assert torch.allclose(exp.experts["<root>"].reshape(3, -1), carried, rtol=1e-9, atol=1e-10)


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
        assert torch.allclose(merged.layers[layer].abs_relevance, whole.layers[layer].abs_relevance)
        assert torch.equal(merged.layers[layer].routed, whole.layers[layer].routed)
        # every token selects k=2 experts
        assert float(whole.layers[layer].routed.sum()) == 2 * whole.layers[layer].tokens == 60
        total = sum(float(e.experts[layer].sum()) for e in exps)
        assert float(whole.layers[layer].relevance.sum()) == pytest.approx(total)
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
