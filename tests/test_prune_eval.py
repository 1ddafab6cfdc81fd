"""Pruning plans, held-out loss, verdicts, per-window scores and the bootstrap
(dlbhooks.analysis.prune_eval / stability) against plain references."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

import dlbhooks as dlb
from dlbhooks.analysis.experts import ExpertStats, _Layer
from dlbhooks.analysis.prune_eval import (
    PruningEvaluation,
    experts_to_drop,
    heldout_loss,
    pruning_plan,
    standard_error,
)
from dlbhooks.analysis.stability import bootstrap_plans, exp_window_scores
from dlbhooks.corpus import explain_batch
from dlbhooks.tiny_moe import corpus_ids, load_tiny_moe


def _stats(rel: dict[str, list[float]], routed: dict[str, list[float]]) -> ExpertStats:
    s = ExpertStats()
    for b in rel:
        r = torch.tensor(rel[b], dtype=torch.float64)
        f = torch.tensor(routed[b], dtype=torch.float64)
        s.layers[b] = _Layer(r.clone(), r.abs(), f, f.clone(), tokens=10)
    return s


def _eval(rel: float, freq: float, rnd: list[float]) -> PruningEvaluation:
    return PruningEvaluation(0.5, 2, "relevance", {"code": 1.4340},
                             {"relevance": {"code": rel}, "frequency": {"code": freq}},
                             {"code": rnd}, {}, ExpertStats())


def test_verdict_names_each_baseline_with_its_own_comparison():
    """(Once a line said "does not beat frequency (+1.2230)" for relevance +1.1244.)"""
    line = _eval(2.5584, 2.6570, [2.50, 2.52, 2.54]).verdict("code")
    se = standard_error([2.50, 2.52, 2.54])
    assert line == ("- code, 50%: relevance-based pruning (+1.1244) **beats** frequency "
                    f"(+1.2230); does **not** beat random (+1.0860 ± {se:.4f} over 3 seeds), "
                    "on the code held-out loss.")
    close = _eval(2.5584, 2.5, [2.55, 2.57, 2.56]).verdict("code")
    assert "does **not** beat frequency (+1.0660)" in close
    # lower than random's mean, by less than two standard errors: not a win
    assert ("; does not clearly beat random (+1.1260 ± 0.0058 over 3 seeds; lower by less "
            "than two standard errors),") in close
    assert "**beats** random" not in close
    worse = _eval(2.5584, 2.5, [2.545, 2.555, 2.565]).verdict("code")
    assert ("does **not** beat random (+1.1210 ± 0.0058 over 3 seeds; higher by less than "
            "two standard errors),") in worse
    clear = _eval(2.5584, 2.5, [2.60, 2.61, 2.62]).verdict("code")
    assert "; **beats** random (+1.1760 ± 0.0058 over 3 seeds)," in clear


def test_standard_error_against_the_formula():
    v = [1.0, 2.0, 4.0]
    m = sum(v) / 3
    assert standard_error(v) == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in v) / 2 / 3),
                                              rel=1e-15)
    assert standard_error([3.0]) == 0.0


def test_fractions_and_plans():
    assert experts_to_drop(8, 0.25, 2) == 2
    with pytest.raises(ValueError, match="prunes none"):
        experts_to_drop(8, 0.05, 2)
    with pytest.raises(ValueError, match="largest fraction is 0.75"):
        experts_to_drop(8, 0.9, 2)
    with pytest.raises(ValueError, match="between 0 and 1"):
        experts_to_drop(8, 1.0, 2)
    s = _stats({"a": [3.0, -0.5, 2.0, 1.0], "b": [0.1, 0.2, -5.0, 0.3]},
               {"a": [1.0, 9.0, 4.0, 2.0], "b": [7.0, 1.0, 2.0, 3.0]})
    assert pruning_plan(s, 2, "relevance") == {"a": [1, 3], "b": [0, 1]}  # least |relevance|
    assert pruning_plan(s, 2, "frequency") == {"a": [0, 3], "b": [1, 2]}
    r = random.Random(7)
    assert pruning_plan(s, 2, "random", seed=7) == {"a": sorted(r.sample(range(4), 2)),
                                                    "b": sorted(r.sample(range(4), 2))}
    with pytest.raises(ValueError, match="unknown ranking"):
        pruning_plan(s, 2, "weight")


@pytest.fixture(scope="module")
def tiny():
    model, _ = load_tiny_moe(dtype=torch.float64)
    rows = corpus_ids("code", "heldout")[:3 * 17].view(3, 17)
    return model, rows


@torch.no_grad()
def test_heldout_loss_against_a_token_loop(tiny):
    model, rows = tiny
    got = heldout_loss(model, rows, batch_size=2)
    total = 0.0
    for row in rows:
        logits = model(input_ids=row[None, :-1]).logits[0]
        for t in range(16):
            total -= float(torch.log_softmax(logits[t], -1)[row[t + 1]])
    assert got == pytest.approx(total / 48, rel=1e-12)


def test_window_scores_sum_to_expert_stats(tiny):
    model, rows = tiny
    exps, mask = explain_batch(model, rows, target="next", positions=[7, 15])
    stats = ExpertStats()
    per = [exp_window_scores(e, mask) for e in exps]
    for e in exps:
        stats.add(e)
    for block, st in stats.layers.items():
        rel = sum(p["relevance"][block] for p in per)  # [rows, E]
        freq = sum(p["frequency"][block] for p in per)
        assert rel.shape == (3, 8)
        torch.testing.assert_close(rel.sum(0), st.abs_relevance, rtol=1e-12, atol=0)
        assert torch.equal(freq.sum(0), st.routed)
        # one row alone: the same relevance as explaining that window by itself
        alone = dlb.explain(model, {"input_ids": rows[1:2, :-1]}, target=[int(rows[1, 8])],
                            position=7)
        want = alone.experts[block][0, :, :8].abs().sum(0)
        torch.testing.assert_close(per[0]["relevance"][block][1], want, rtol=1e-9, atol=1e-12)


def test_bootstrap_against_a_loop():
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(12, 6, generator=g, dtype=torch.float64),
              "b": torch.rand(12, 6, generator=g, dtype=torch.float64)}
    boot = bootstrap_plans(scores, 2, resamples=50, seed=3)
    draws = torch.randint(0, 12, (50, 12), generator=torch.Generator().manual_seed(3))
    counts: Counter = Counter()
    agree = {"a": 0, "b": 0}
    full = {b: sorted(torch.argsort(s.sum(0), stable=True)[:2].tolist())
            for b, s in scores.items()}
    for r in range(50):
        plan = []
        for b, s in scores.items():
            total = sum(s[int(i)] for i in draws[r])  # window by window
            ids = sorted(torch.argsort(total, stable=True)[:2].tolist())
            plan.append((b, tuple(ids)))
            agree[b] += ids == full[b]
        counts[tuple(plan)] += 1
    assert boot.counts == counts
    assert boot.agreement == {b: n / 50 for b, n in agree.items()}
    assert dict(boot.full) == {b: tuple(v) for b, v in full.items()}
    inc = boot.expert_inclusion()
    assert all(float(v.sum()) == pytest.approx(2.0) for v in inc.values())
