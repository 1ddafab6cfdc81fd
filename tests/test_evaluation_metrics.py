"""dlbhooks.evaluation: metrics and attribution baselines against hand-computed values (closed
forms on linear models, slow loops elsewhere), at the precision the code reaches."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import tiny_llama
from torch import nn

import dlbhooks as dlb
from dlbhooks.evaluation import (
    abpc,
    average_ranks,
    complexity,
    conservation_report,
    dlbhooks_attribution,
    faithfulness_correlation,
    gradient_x_input,
    integrated_gradients,
    max_sensitivity,
    mprt,
    pearson,
    perturbation_curve,
    random_attribution,
    randomisation_check,
    recency_attribution,
    score,
    sparseness,
    spearman,
)

F64 = torch.float64


def close(a, b, tol=1e-12):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64),
                               rtol=0, atol=tol)


def linear(n_in=6, n_out=1, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias).double().eval()


def mlp(seed=0, act=nn.ReLU):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 8), act(),
                         nn.Linear(8, 3)).double().eval()


def token_batch():
    """Two rows of 6 tokens, the second left-padded by 2."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (2, 6), generator=g)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def hand_curve(contrib, order, bias=0.0):
    """Closed form for a linear logit with replacement 0: the remaining contributions'
    sum after removing 0, 1, ..., n features in order (ties by index), and its
    trapezoid area over fractions k/n."""
    n = len(contrib)
    key = (lambda i: -contrib[i]) if order == "morf" else (lambda i: contrib[i])
    ranked = sorted(range(n), key=key)  # Python's sort is stable: ties by index
    values = [bias + sum(contrib[i] for i in ranked[k:]) for k in range(n + 1)]
    auc = sum((values[k] + values[k + 1]) / 2 for k in range(n)) / n
    return values, auc


# -- perturbation curves: linear models in closed form -------------------------------------------
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_linear_curves_are_cumulative_sums_of_sorted_contributions(order):
    model = linear()
    x = torch.randn(4, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    r = (model.weight[0] * x).detach()
    curve = perturbation_curve(model, x, r, 0, order=order, replace=0.0, metric="logit")
    close(curve.fractions, torch.arange(7, dtype=F64) / 6)
    for b in range(4):
        values, auc = hand_curve(r[b].tolist(), order)
        close(curve.values[b], values)
        close(curve.auc[b], auc)


def test_two_class_linear_logit_and_probability():
    model = linear(n_out=2, bias=True)
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(1))
    r = (model.weight[1] * x).detach()
    curve = perturbation_curve(model, x, r, 1, replace=0.0, metric="logit")
    for b in range(3):
        close(curve.values[b], hand_curve(r[b].tolist(), "morf", float(model.bias[1].detach()))[0])
    prob = perturbation_curve(model, x, r, 1, replace=0.0, metric="prob")
    other = perturbation_curve(model, x, (model.weight[1] * x).detach(), 0, replace=0.0,
                               metric="logit")  # the same removal order, logit of class 0
    close(prob.values, torch.stack([other.values, curve.values]).softmax(0)[1])


def test_ideal_ranking_has_nonnegative_abpc_and_reversal_swaps_the_curves():
    model = linear()
    x = torch.randn(5, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    r = (model.weight[0] * x).detach()
    kw = dict(replace=0.0, metric="logit")
    ideal = abpc(model, x, r, 0, **kw)
    assert (ideal.delta >= 0).all()
    close(ideal.delta, ideal.lerf.auc - ideal.morf.auc)
    reverse = abpc(model, x, -r, 0, **kw)  # no ties: reversed order, MoRF <-> LeRF
    close(reverse.morf.values, ideal.lerf.values)
    close(reverse.lerf.values, ideal.morf.values)
    close(reverse.delta, -ideal.delta)


@pytest.mark.parametrize("steps, points", [(3, [0, 2, 4, 6]), (4, [0, 1, 3, 4, 6]),
                                           (6, list(range(7)))])
def test_steps_group_features_in_equal_increments(steps, points):
    """Point k removes floor(k·n/steps) features: the one-at-a-time curve at those counts."""
    model = linear()
    x = torch.randn(2, 6, dtype=F64, generator=torch.Generator().manual_seed(3))
    r = (model.weight[0] * x).detach()
    full = perturbation_curve(model, x, r, 0, replace=0.0, metric="logit")
    grouped = perturbation_curve(model, x, r, 0, steps=steps, replace=0.0, metric="logit")
    close(grouped.fractions, torch.arange(steps + 1, dtype=F64) / steps)
    close(grouped.values, full.values[:, points])
    close(grouped.auc, torch.trapezoid(grouped.values, grouped.fractions, dim=-1))


def test_ties_are_broken_by_feature_index_in_both_orders():
    """Weights 10^i make each curve value name the features removed so far."""
    model = nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(10.0 ** torch.arange(5, dtype=F64))
    x = torch.ones(1, 5, dtype=F64)
    r = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]], dtype=F64)
    w = [10.0 ** i for i in range(5)]
    for order, ranked in (("morf", [1, 2, 4, 0, 3]), ("lerf", [3, 0, 1, 2, 4])):
        curve = perturbation_curve(model, x, r, 0, order=order, replace=0.0, metric="logit")
        close(curve.values[0], [sum(w[i] for i in ranked[k:]) for k in range(6)])


def test_replacement_tensor_broadcasts_and_row_targets_and_tensor_errors():
    model = linear(n_out=2, bias=True)
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(4))
    mean = torch.randn(6, dtype=F64, generator=torch.Generator().manual_seed(5))
    r = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0, 1, 1])
    curve = perturbation_curve(model, x, r, t, replace=mean, metric="logit", steps=2)
    for b in range(3):
        ranked = sorted(range(6), key=lambda i: -float(r[b, i]))
        for k, m in enumerate([0, 3, 6]):
            xp = x[b].clone()
            xp[ranked[:m]] = mean[ranked[:m]]
            close(curve.values[b, k], model(xp)[t[b]])
    with pytest.raises(ValueError, match="token inputs"):
        perturbation_curve(model, x, r, t, replace="delete")
    with pytest.raises(ValueError, match="shaped like the input"):
        perturbation_curve(model, x, r[:, :3], t, replace=0.0)


# -- token inputs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def last_logit(model, ids, mask, target, position_ids=None):
    kw = {} if position_ids is None else {"position_ids": position_ids[None]}
    with torch.no_grad():
        out = model(input_ids=ids[None], attention_mask=mask[None], **kw).logits
    return float(out[0, -1, target])


def test_token_curve_replaces_by_id_and_never_removes_padding(llama):
    inputs = token_batch()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    r = torch.randn(2, 6, dtype=F64, generator=torch.Generator().manual_seed(7))
    r[1, :2] = 100.0  # padding: most relevant of all, yet never removed
    t = torch.tensor([3, 4])
    curve = perturbation_curve(llama, inputs, r, t, replace=7, metric="logit")
    assert curve.values.shape == (2, 7)  # steps: the longest row's 6 real tokens
    for b, real in ((0, list(range(6))), (1, list(range(2, 6)))):
        ranked = sorted(real, key=lambda i: -float(r[b, i]))
        for k in range(7):
            m = k * len(real) // 6
            removed = ids[b].clone()
            removed[ranked[:m]] = 7
            close(curve.values[b, k], last_logit(llama, removed, mask[b], t[b]), 1e-10)
    probs = perturbation_curve(llama, inputs, r, t, replace=7, metric="prob")
    close(probs.values[:, 0], score(llama, inputs, t, "prob"), 1e-12)


def test_token_deletion_packs_kept_tokens_to_the_right(llama):
    """'delete': the kept tokens in order, left-padded (attention_mask 0, pad id 0),
    position_ids = cumsum(mask) - 1 clamped at 0, scored at the last slot."""
    inputs = token_batch()
    ids = inputs["input_ids"]
    r = torch.randn(2, 6, dtype=F64, generator=torch.Generator().manual_seed(8))
    t = torch.tensor([5, 6])
    curve = perturbation_curve(llama, inputs, r, t, order="lerf", replace="delete",
                               metric="logit")
    for b, real in ((0, list(range(6))), (1, list(range(2, 6)))):
        ranked = sorted(real, key=lambda i: float(r[b, i]))
        for k in range(7):
            m = k * len(real) // 6
            kept = [i for i in real if i not in ranked[:m]]
            new = torch.zeros(6, dtype=torch.long)
            mask = torch.zeros(6, dtype=torch.long)
            if kept:
                new[6 - len(kept):] = ids[b, kept]
                mask[6 - len(kept):] = 1
            pos = (mask.cumsum(0) - 1).clamp_min(0)
            close(curve.values[b, k], last_logit(llama, new, mask, t[b], pos), 1e-10)
    assert torch.isfinite(curve.values).all()  # everything deleted: an all-masked row
    close(curve.values[0, 0], score(llama, inputs, t, "logit")[0], 1e-12)
    with pytest.raises(ValueError, match="position"):
        perturbation_curve(llama, inputs, r, t, replace="delete", position=-2)


def test_patch_unit_removes_whole_patches(llama):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(32, 3)).double().eval()
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 4, 4, dtype=F64, generator=g)
    r = torch.randn(2, 3, 4, 4, dtype=F64, generator=g)
    fill = x.mean((0, 2, 3)).view(3, 1, 1)  # per-channel mean
    curve = perturbation_curve(model, x, r, torch.tensor([0, 2]), replace=fill,
                               metric="prob", unit=(2, 2))
    assert curve.values.shape == (2, 5)
    corners = [(0, 0), (0, 2), (2, 0), (2, 2)]  # patch i: rows, cols from these corners
    for b in range(2):
        sums = [float(r[b, :, i:i + 2, j:j + 2].sum()) for i, j in corners]
        ranked = sorted(range(4), key=lambda p: -sums[p])
        xp = x[b].clone()
        for k in range(5):
            if k:
                i, j = corners[ranked[k - 1]]
                xp[:, i:i + 2, j:j + 2] = fill
            with torch.no_grad():
                expect = model(xp[None]).softmax(-1)[0, [0, 2][b]]
            close(curve.values[b, k], expect)


# -- faithfulness correlation ----------------------------------------------------------------------
def test_faithfulness_correlation_is_one_for_exact_contributions_of_a_linear_logit():
    model = linear(n_in=10)
    x = torch.randn(4, 10, dtype=F64, generator=torch.Generator().manual_seed(10))
    r = (model.weight[0] * x).detach()
    kw = dict(subset_size=3, n_subsets=20, replace=0.0, metric="logit", batch_size=16)
    close(faithfulness_correlation(model, x, r, 0, **kw), torch.ones(4))
    close(faithfulness_correlation(model, x, -r, 0, **kw), -torch.ones(4))
    noise = torch.randn(4, 10, dtype=F64, generator=torch.Generator().manual_seed(11))
    rho = faithfulness_correlation(model, x, noise, 0, **kw)
    assert (rho.abs() < 1 - 1e-3).all()


def test_faithfulness_correlation_on_tokens_counts_real_tokens_only(llama):
    inputs = token_batch()
    t = torch.tensor([3, 4])
    r = torch.randn(2, 6, dtype=F64, generator=torch.Generator().manual_seed(12))
    rho = faithfulness_correlation(llama, inputs, r, t, subset_size=2, n_subsets=8,
                                   replace=7, metric="logit")
    assert rho.shape == (2,) and torch.isfinite(rho).all() and (rho.abs() <= 1).all()


# -- complexity, sparseness, correlations ----------------------------------------------------------
def test_complexity_and_sparseness_hand_values():
    r = torch.tensor([[1.0] * 8, [0, 0, 0, -5.0, 0, 0, 0, 0],
                      [1.0, -2.0, 3.0, 0, 0, 0, 0, 0]], dtype=F64)
    p = [1 / 6, 2 / 6, 3 / 6]
    close(complexity(r), [math.log(8), 0.0, -sum(q * math.log(q) for q in p)])
    # Gini: sum_i (2i - n - 1) a_(i) / (n sum a), a sorted ascending: 1, 2, 3 at i = 6, 7, 8
    close(sparseness(r), [0.0, 7 / 8, (3 * 1 + 5 * 2 + 7 * 3) / (8 * 6)])
    mask = torch.tensor([[1, 1, 0, 0]])
    padded = torch.tensor([[2.0, 2.0, 9.0, 9.0]], dtype=F64)
    close(complexity(padded, mask), [math.log(2)])
    close(sparseness(padded, mask), [0.0])
    assert torch.isnan(sparseness(torch.zeros(1, 3))).all()


def test_spearman_with_ties_matches_a_loop():
    g = torch.Generator().manual_seed(13)
    a = torch.randint(0, 5, (4, 20), generator=g).double()
    b = torch.randint(0, 4, (4, 20), generator=g).double()

    def ranks(row):
        return [sum(v < x for v in row) + (sum(v == x for v in row) + 1) / 2 for x in row]

    def corr(u, v):
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        num = sum((p - mu) * (q - mv) for p, q in zip(u, v))
        return num / math.sqrt(sum((p - mu) ** 2 for p in u) * sum((q - mv) ** 2 for q in v))

    close(average_ranks(a), [ranks(row.tolist()) for row in a])
    close(spearman(a, b), [corr(ranks(u.tolist()), ranks(v.tolist())) for u, v in zip(a, b)])
    close(pearson(a, b), [corr(u.tolist(), v.tolist()) for u, v in zip(a, b)])
    close(spearman(a.view(4, 4, 5), a.view(4, 4, 5) * 3 + 1), torch.ones(4))  # flattened
    mask = torch.arange(20) < torch.tensor([[20], [15], [9], [4]])  # per-row real features
    for fn in (spearman, pearson):
        close(fn(a, b, mask), [fn(a[i:i + 1, :n], b[i:i + 1, :n])[0]
                               for i, n in enumerate((20, 15, 9, 4))])


# -- attributions ----------------------------------------------------------------------------------
def test_gradient_x_input_and_integrated_gradients_on_a_linear_model():
    model = linear(n_out=2, bias=True)
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(14))
    t = torch.tensor([1, 0, 1])
    exact = (model.weight[t] * x).detach()
    torch.testing.assert_close(gradient_x_input()(model, x, t), exact, rtol=0, atol=0)
    close(integrated_gradients(steps=7, max_rows=6)(model, x, t), exact)  # chunked
    base = torch.full((6,), 0.5, dtype=F64)
    close(integrated_gradients(baseline=base)(model, x, t), model.weight[t].detach() * (x - base))


def test_integrated_gradients_midpoint_error_bound_on_a_smooth_mlp():
    """Midpoint rule: |∫g - (1/m) Σ g(α_k)| <= max|g''| / (24 m²) per feature, g(α) the
    gradient along the path; max|g''| estimated by finite differences on a 1024 grid."""
    model = mlp(act=nn.Tanh)
    x = torch.randn(2, 6, dtype=F64, generator=torch.Generator().manual_seed(15))
    t = torch.tensor([0, 2])
    ig = integrated_gradients(steps=32)(model, x, t)
    ref = integrated_gradients(steps=1024)(model, x, t)
    grid = (torch.arange(1025, dtype=F64) / 1024).view(-1, 1, 1)
    path = (grid * x).reshape(-1, 6).requires_grad_(True)
    out = model(path).view(1025, 2, 3).gather(2, t.view(1, 2, 1).expand(1025, 2, 1)).sum()
    (grad,) = torch.autograd.grad(out, path)
    g = grad.view(1025, 2, 6)
    second = ((g[2:] - 2 * g[1:-1] + g[:-2]) * 1024**2).abs().amax(0)
    bound = x.abs() * 1.1 * second * (1 / (24 * 32**2) + 1 / (24 * 1024**2))
    err = (ig - ref).abs()
    assert (err <= bound + 1e-15).all() and err.max() > 1e-9
    with torch.no_grad():  # completeness: Σ IG = f(x) - f(0), to the quadrature error
        gap = (model(x) - model(torch.zeros_like(x))).gather(1, t[:, None])[:, 0]
    close(ref.sum(1), gap, 1e-5)


@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_dlbhooks_attribution_returns_explain_inputs(mode, llama):
    model = mlp()
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(16))
    t = torch.tensor([0, 1, 2])
    exp = dlb.explain(model, x, t, mode=mode)
    torch.testing.assert_close(dlbhooks_attribution(mode)(model, x, t), exp.inputs["input"],
                               rtol=0, atol=0)
    inputs = token_batch()
    tt = torch.tensor([3, 4])
    exp = dlb.explain(llama, inputs, tt, mode=mode)
    got = dlbhooks_attribution(mode)(llama, inputs, tt)
    torch.testing.assert_close(got, exp.inputs["input_ids"], rtol=0, atol=0)
    assert got.shape == (2, 6) and (got[1, :2] == 0).all()
    if mode == "contrastive":
        close(got, exp.positive["input_ids"] - exp.negative["input_ids"])


def test_gradient_attributions_on_tokens_are_per_token(llama):
    inputs = token_batch()
    t = torch.tensor([3, 4])
    gxi = gradient_x_input()(llama, inputs, t)
    ig = integrated_gradients(steps=4)(llama, inputs, t)
    emb = llama.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_(True)
    s = llama(inputs_embeds=emb, attention_mask=inputs["attention_mask"]).logits[:, -1]
    (grad,) = torch.autograd.grad(s.gather(1, t[:, None]).sum(), emb)
    close(gxi, (grad * emb).sum(-1).detach() * inputs["attention_mask"])
    assert ig.shape == (2, 6) and (ig[1, :2] == 0).all() and (gxi[1, :2] == 0).all()


def test_random_and_recency_baselines(llama):
    x = torch.randn(3, 5, dtype=F64)
    a, b, c = (random_attribution(s)(None, x, 0) for s in (0, 0, 1))
    assert a.shape == x.shape and a.dtype == F64 and torch.equal(a, b) and not torch.equal(a, c)
    inputs = token_batch()
    r = random_attribution(3)(llama, inputs, 0)
    assert r.shape == (2, 6) and (r[1, :2] == 0).all() and (r[0] > 0).all()
    close(recency_attribution()(llama, inputs, 0), [[1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4]])
    right = {"input_ids": torch.ones(1, 4, dtype=torch.long),
             "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    close(recency_attribution()(llama, right, 0), [[1, 2, 3, 0]])
    with pytest.raises(TypeError):
        recency_attribution()(None, x, 0)


def test_score_reads_positions_and_single_outputs():
    logits = torch.randn(2, 4, 5, dtype=F64)
    model = nn.Identity()
    pos = torch.tensor([1, 3])
    close(score(model, logits, torch.tensor([2, 0]), "logit", pos),
          [logits[0, 1, 2], logits[1, 3, 0]])
    close(score(model, logits, 1, "prob"), logits[:, -1].softmax(-1)[:, 1])
    one = torch.randn(3, 1, dtype=F64)
    close(score(model, one, 0, "prob"), one[:, 0].sigmoid())


# -- robustness ------------------------------------------------------------------------------------
def test_max_sensitivity_of_gradient_x_input_on_a_linear_model():
    """a(x) = w⊙x, so ||a(x+δ) - a(x)|| / ||a(x)|| = ||w⊙δ|| / ||w⊙x||, δ from the seed."""
    model = linear()
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(17))
    got = max_sensitivity(gradient_x_input(), model, x, 0, radius=0.1, n_samples=5, seed=4)
    w = model.weight[0].detach()
    gen = torch.Generator().manual_seed(4)
    ratios = []
    for _ in range(5):
        delta = 0.1 * (2 * torch.rand(x.shape, generator=gen, dtype=F64) - 1)
        ratios.append((w * delta).norm(dim=1) / (w * x).norm(dim=1))
    close(got, torch.stack(ratios).amax(0))
    assert (max_sensitivity(random_attribution(), model, x, 0, radius=0.1) == 0).all()
    with pytest.raises(TypeError, match="float tensor"):
        max_sensitivity(gradient_x_input(), model, token_batch(), 0, radius=0.1)


def test_mprt_matches_its_definition_and_is_monotonic():
    model = linear(n_in=12)
    x = torch.randn(4, 12, dtype=F64, generator=torch.Generator().manual_seed(18))
    levels = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
    attribute = gradient_x_input()
    got = mprt(attribute, model, x, 0, noise_levels=levels, threshold=0.8, n_samples=2, seed=5)
    gen = torch.Generator().manual_seed(5)  # the definition, level by level
    sd = x.std(0, correction=0)
    z = [torch.randn(x.shape, generator=gen, dtype=F64) * sd for _ in range(2)]
    base = attribute(model, x, 0)
    for b in range(4):
        expect = 0.0
        for level in levels:
            sims = [float(spearman(attribute(model, x + level * zs, 0), base)[b]) for zs in z]
            if sum(sims) / 2 < 0.8:
                break
            expect = level
        close(got[b], expect)
    results = [mprt(attribute, model, x, 0, noise_levels=levels, threshold=th, seed=5)
               for th in (-1.0, 0.3, 0.6, 0.9, 0.99, 1.01)]
    for lo, hi in zip(results, results[1:]):  # a stricter threshold, less noise tolerated
        assert (hi <= lo).all()
    close(results[0], torch.full((4,), 3.2, dtype=F64))  # similarity >= -1 always
    close(results[-1], torch.zeros(4))  # similarity <= 1 never reaches 1.01
    steady = mprt(random_attribution(), model, x, 0, noise_levels=levels)  # input-blind
    close(steady, torch.full((4,), 3.2, dtype=F64))
    with pytest.raises(ValueError, match="increasing"):
        mprt(attribute, model, x, 0, noise_levels=[0.2, 0.1])


@pytest.mark.parametrize("attribute", [gradient_x_input(), dlbhooks_attribution(),
                                       dlbhooks_attribution("contrastive")],
                         ids=["gradient_x_input", "dlbhooks", "dlbhooks_contrastive"])
def test_randomisation_check_cascades_on_a_copy(attribute):
    """(DLBacktrace's default mode keeps a Spearman similarity near 0.99 here while the
    top layers are randomised: its input relevance follows |w·a| of the first layer.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3)).double().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 16, dtype=F64, generator=torch.Generator().manual_seed(19))
    t = torch.tensor([0, 1, 2, 0])
    names, sims = randomisation_check(attribute, model, x, t, seed=1)
    assert names == ["(original)", "4", "2", "0"]  # output side first
    assert sims.shape == (4, 4)
    close(sims[0], torch.ones(4))
    assert (sims[1:] < 1 - 1e-6).all() and (sims[-1] < 0.95).all()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    again = randomisation_check(attribute, model, x, t, seed=1)[1]
    torch.testing.assert_close(again, sims, rtol=0, atol=0)  # deterministic given the seed


# -- DLBacktrace's ledger --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["default", "contrastive"])
def test_conservation_report_shares_sum_to_one(mode):
    model = mlp()
    x = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(20))
    exp = dlb.explain(model, x, torch.tensor([0, 1, 2]), mode=mode)
    report = conservation_report(exp)
    assert report["mode"] == mode and report["conservation_error"] < 1e-12
    streams = report["streams"]
    assert list(streams) == (["default"] if mode == "default" else ["positive", "negative"])
    for name, stream in streams.items():
        close(stream["seeded"], 300.0, 1e-9)
        close(stream["total"], 1.0)
        inputs = exp.inputs if name == "default" else getattr(exp, name)
        close(stream["inputs"]["input"], inputs["input"].sum() / 300.0)
    if mode == "default":
        assert set(streams["default"]["absorbed"]) == {"Linear"}  # the biases' shares
        close(streams["default"]["absorbed"]["Linear"], exp.total_absorbed / 300.0)


def test_randomisation_check_on_tokens(llama):
    before = copy.deepcopy(llama.state_dict())
    inputs = token_batch()
    names, sims = randomisation_check(gradient_x_input(), llama, inputs, torch.tensor([3, 4]))
    assert names[1] == "lm_head" and names[-1] == "model.embed_tokens"
    assert len(names) == len(sims) == 22  # 20 linears and norms of 2 layers, norm, head
    close(sims[0], torch.ones(2))
    assert (sims[1:].mean(0) < 0.9).all()  # (6 tokens: a chance rank match can give 1)
    for k, v in llama.state_dict().items():
        assert torch.equal(v, before[k]), k
