"""Ground-truth tasks (``dlbhooks.evaluation.tasks``): tiny models trained on synthetic data
whose relevant inputs are planted, and the scores that compare a relevance map with them.

Every task is built once with ``quick=True`` (a few seconds in all) and explained on
:data:`N` held-out examples. Thresholds: held-out accuracy at least :data:`ACCURACY` (measured
0.976-1.0 over seeds 0-2); DLBacktrace's default mode ranks the planted inputs first at
least twice as often as a random ranking would (measured mean precision@k here: LM 0.89,
encoder 0.50, tabular 0.52, image 0.94, against chance 0.08, 0.09, 0.20, 0.06).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import dlbhooks as dlb
from dlbhooks.evaluation.tasks import (
    LM_LEN,
    LM_MARK,
    LM_QUERY,
    LM_VALUE0,
    TASKS,
    GroundTruthTask,
    build_task,
    explain_relevance,
    ground_truth_scores,
)

N = 32  # examples explained per task
ACCURACY = 0.95
KINDS = {"lm_recall": "causal_lm", "encoder_trigger": "classifier",
         "tabular_planted": "tabular", "image_patch": "image"}
PLANTED = {"lm_recall": 2, "encoder_trigger": 1, "tabular_planted": 4, "image_patch": 16}
#: tasks on which contrastive mode's signed ranking clearly beats chance (measured on seeds
#: 0-2, quick builds: LM 0.55-0.65 vs 0.08, image 0.39-0.49 vs 0.06); on the encoder
#: (0.39-0.53, but 0.17 after the full budget) and tabular (0.28-0.30 vs 0.20) it is not
#: asserted
CONTRASTIVE_CLEAR = ("lm_recall", "image_patch")


@pytest.fixture(scope="module")
def tasks() -> dict[str, GroundTruthTask]:
    return {name: build_task(name, n_explain=N, quick=True) for name in TASKS}


@pytest.fixture(scope="module")
def relevance(tasks) -> dict[str, dict[str, Tensor]]:
    """Per task: DLBacktrace default and contrastive, gradient × input, recency, oracle."""
    out = {}
    for name, task in tasks.items():
        n, flat = len(task.target), task.relevant[0].numel()
        out[name] = {
            "default": explain_relevance(task, mode="default"),
            "contrastive": explain_relevance(task, mode="contrastive"),
            "grad_x_input": gradient_x_input(task),
            "recency": torch.arange(flat).double().expand(n, -1).reshape(task.relevant.shape),
            "oracle": task.relevant.double(),
        }
    return out


def gradient_x_input(task: GroundTruthTask) -> Tensor:
    """Plain autograd: d target logit / d input × input (per token: summed over the
    embedding), shaped like ``task.relevant``."""
    model = task.model
    if isinstance(task.inputs, dict):
        emb = model.get_input_embeddings()(task.inputs["input_ids"]).detach().requires_grad_()
        out = model(inputs_embeds=emb, attention_mask=task.inputs["attention_mask"]).logits
        logits = out[:, -1] if task.kind == "causal_lm" else out
        logits.gather(1, task.target[:, None]).sum().backward()
        return (emb.grad * emb).sum(-1).detach()
    x = task.inputs.clone().requires_grad_()
    model(x).gather(1, task.target[:, None]).sum().backward()
    return (x.grad * x).detach()


def predictions(task: GroundTruthTask) -> Tensor:
    with torch.no_grad():
        if task.kind == "causal_lm":
            return task.model(**task.inputs).logits[:, -1].argmax(-1)
        if task.kind == "classifier":
            return task.model(**task.inputs).logits.argmax(-1)
        return task.model(task.inputs).argmax(-1)


# -- the tasks ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TASKS)
def test_a_task_is_trained_and_explains_correct_held_out_predictions(tasks, name):
    task = tasks[name]
    assert task.name == name and task.kind == KINDS[name]
    assert task.accuracy >= ACCURACY, task.info
    assert not task.model.training
    assert all(p.dtype == torch.float64 for p in task.model.parameters())
    assert task.target.shape == (N,)
    assert torch.equal(predictions(task), task.target)
    assert task.relevant.dtype == torch.bool and len(task.relevant) == N
    assert (task.relevant.reshape(N, -1).sum(1) == PLANTED[name]).all()
    assert task.info["train_seconds"] < 60 and task.info["seed"] == 0


def test_the_relevance_shapes_are_the_input_shapes(tasks):
    assert tasks["lm_recall"].relevant.shape == (N, LM_LEN)
    assert tasks["encoder_trigger"].relevant.shape == tasks["encoder_trigger"].mask.shape
    assert tasks["tabular_planted"].relevant.shape == tasks["tabular_planted"].inputs.shape
    assert tasks["image_patch"].relevant.shape == tasks["image_patch"].inputs.shape == (
        N, 1, 16, 16)


def test_lm_recall_plants_mark_and_value_away_from_the_end(tasks):
    task = tasks["lm_recall"]
    ids, rows = task.inputs["input_ids"], torch.arange(N)
    where = task.relevant.nonzero()[:, 1].reshape(N, 2)
    mark, value = where[:, 0], where[:, 1]
    assert (value == mark + 1).all() and (mark >= 1).all()
    assert (value < LM_LEN - LM_LEN // 4).all()  # never in the last quarter
    assert (ids[rows, mark] == LM_MARK).all() and (ids[:, -1] == LM_QUERY).all()
    assert torch.equal(ids[rows, value], task.target) and (task.target >= LM_VALUE0).all()
    assert ((ids == LM_MARK).sum(1) == 1).all()
    # value tokens also appear as distractors: the model must find the marked one
    assert ((ids >= LM_VALUE0).sum(1) > 1).float().mean() > 0.5


def test_encoder_trigger_sits_on_a_real_token_and_padding_is_masked(tasks):
    task = tasks["encoder_trigger"]
    ids, mask = task.inputs["input_ids"], task.mask
    assert torch.equal(mask, task.inputs["attention_mask"].bool())
    assert not (task.relevant & ~mask).any() and not task.relevant[:, 0].any()  # not [CLS]
    assert (ids[task.relevant] - 2 == task.target).all()  # trigger A = class 0, B = class 1
    assert (~mask).any()  # some rows are padded


def test_tabular_label_reads_the_informative_features_only(tasks):
    task = tasks["tabular_planted"]
    cols = task.info["informative"]
    assert len(cols) == 4 and task.relevant[:, cols].all() and task.relevant.sum() == 4 * N
    x = task.inputs.clone()
    others = [c for c in range(x.shape[1]) if c not in cols]
    x[:, others] = torch.randn(N, len(others), dtype=x.dtype)  # label still decided by cols
    a, b, c, d = cols
    assert torch.equal((x[:, a] + x[:, b] - x[:, c] - x[:, d] > 0).long(), task.target)


@pytest.mark.parametrize("name", TASKS)
def test_a_build_is_deterministic_and_leaves_rng_and_threads_alone(tasks, name):
    threads, state = torch.get_num_threads(), torch.get_rng_state()
    again = build_task(name, n_explain=N, quick=True)
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), state)
    first = tasks[name]
    ref = first.model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in again.model.state_dict().items())
    if isinstance(first.inputs, dict):
        assert all(torch.equal(v, first.inputs[k]) for k, v in again.inputs.items())
    else:
        assert torch.equal(again.inputs, first.inputs)
    assert torch.equal(again.target, first.target)
    assert torch.equal(again.relevant, first.relevant)
    assert again.accuracy == first.accuracy


def test_an_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown task"):
        build_task("nope")


# -- the scores -----------------------------------------------------------------------------
def test_scores_by_hand_with_ties_and_padding():
    nan = math.nan
    relevance = torch.tensor([[3.0, 1.0, 3.0, 0.0, -1.0],   # tie 3/3: index 0 ranks first
                              [0.0, 0.0, 5.0, 2.0, 2.0],    # 5.0 is padding; tie 2/2
                              [0.0, 0.0, 0.0, 0.0, 0.0],    # all tied: index order
                              [1.0, 2.0, nan, 0.0, 0.0]])   # relevant only on padding
    relevant = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1],
                             [0, 0, 1, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 1, 1]])
    s = ground_truth_scores(relevance, relevant, mask)
    expect = {"top_k_hit": [0.5, 1.0, 0.0, nan], "top1": [0.0, 1.0, 0.0, nan],
              "mass": [4 / 7, 2 / 4, 0.0, 0.0], "mass_abs": [4 / 8, 2 / 4, 0.0, 0.0],
              "chance": [2 / 5, 1 / 4, 1 / 5, 0.0], "k": [2, 1, 1, 0]}
    for key, values in expect.items():
        torch.testing.assert_close(s[key].double(), torch.tensor(values, dtype=torch.float64),
                                   equal_nan=True, msg=key)


def test_scores_rank_by_signed_value_unless_absolute():
    relevance = torch.tensor([[-5.0, 1.0, 2.0, 0.0]])
    relevant = torch.tensor([[True, False, False, False]])
    signed = ground_truth_scores(relevance, relevant)
    absolute = ground_truth_scores(relevance, relevant, absolute=True)
    assert signed["top1"].item() == 0.0 and absolute["top1"].item() == 1.0
    assert signed["mass"].item() == 0.0 and absolute["mass"].item() == 0.0
    assert absolute["mass_abs"].item() == pytest.approx(5 / 8)


def test_scores_check_their_arguments():
    with pytest.raises(ValueError, match="shaped like"):
        ground_truth_scores(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="not finite"):
        ground_truth_scores(torch.tensor([[math.inf, 0.0]]), torch.tensor([[True, False]]))


@pytest.mark.parametrize("name", TASKS)
def test_the_oracle_scores_one(tasks, relevance, name):
    s = ground_truth_scores(relevance[name]["oracle"], tasks[name].relevant, tasks[name].mask)
    for key in ("top_k_hit", "top1", "mass", "mass_abs"):
        assert (s[key] == 1).all(), key


@pytest.mark.parametrize("name", ["lm_recall", "encoder_trigger"])
def test_recency_does_not_find_the_planted_tokens(tasks, relevance, name):
    task = tasks[name]
    s = ground_truth_scores(relevance[name]["recency"], task.relevant, task.mask)
    assert s["top_k_hit"].mean() < 0.3
    if name == "lm_recall":
        assert (s["top_k_hit"] == 0).all()  # the last quarter holds no planted token


# -- explanations ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", TASKS)
def test_dlbhooks_finds_the_planted_inputs_better_than_chance(tasks, relevance, name):
    task = tasks[name]
    for method in ("default", "contrastive", "grad_x_input"):
        r = relevance[name][method]
        assert r.shape == task.relevant.shape and torch.isfinite(r).all(), method
    chance = ground_truth_scores(relevance[name]["oracle"], task.relevant,
                                 task.mask)["chance"].mean()
    default = ground_truth_scores(relevance[name]["default"], task.relevant, task.mask)
    assert default["top_k_hit"].mean() > 2 * chance
    if name in CONTRASTIVE_CLEAR:
        contrastive = ground_truth_scores(relevance[name]["contrastive"], task.relevant,
                                          task.mask)
        assert contrastive["top_k_hit"].mean() > 2 * chance


def test_explain_relevance_is_dlb_explain_on_the_task(tasks, relevance):
    task = tasks["tabular_planted"]
    exp = dlb.explain(task.model, task.inputs, target=task.target)
    torch.testing.assert_close(exp.inputs["input"], relevance["tabular_planted"]["default"],
                               rtol=0, atol=0)


def test_hit_rates_table(tasks, relevance, capsys):
    """Prints mean precision@k, top-1 and positive mass per task and method (``-s``)."""
    rows = []
    for name, task in tasks.items():
        for method, r in relevance[name].items():
            s = ground_truth_scores(r, task.relevant, task.mask)
            means = [s[k].mean().item() for k in ("top_k_hit", "top1", "mass", "chance")]
            assert all(0 <= m <= 1 for m in means)
            rows.append(f"{name:16s} {method:13s} " + " ".join(f"{m:6.3f}" for m in means))
    with capsys.disabled():
        print("\ntask             method        top_k   top1   mass chance\n" + "\n".join(rows))
