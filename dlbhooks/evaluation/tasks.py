"""Ground-truth tasks: tiny models trained on synthetic data whose relevant inputs are known.

Perturbation metrics on language mostly reward explaining the last tokens (a recency ranking
scores almost as well as any method on next-token prediction). Here the inputs that decide
each answer are planted, and are not the most recent ones:

- ``lm_recall`` (causal LM, a 2-layer Llama): 24 tokens of filler (which includes the value
  tokens as distractors), one ``MARK v`` pair at positions 1–17 (never the first token,
  never the last quarter), a ``QUERY`` token last; the next token is ``v``. Relevant: the
  marker and the value.
- ``encoder_trigger`` (a 2-layer BERT classifier): ``[CLS]`` + 7–15 filler tokens, right
  padded to 16; one trigger token (``A`` or ``B``) at a random real position decides the
  class. Relevant: the trigger. ``task.mask`` is the attention mask (padding excluded).
- ``tabular_planted`` (an MLP): 20 standard-normal features, 4 of them (chosen by the seed)
  informative: ``y = [x_a + x_b - x_c - x_d > 0]``. Relevant: those 4 columns.
- ``image_patch`` (a small CNN): 16×16 single-channel N(0, 1) noise with a 4×4 stripe
  pattern (±2) at a random place: horizontal stripes are class 0, vertical ones class 1
  (zero mean, so the image's brightness says nothing). Relevant: the patch's 16 pixels.

Data are drawn fresh for every training step (no example is seen twice), training runs on
one CPU thread with its own seeds (the global RNG and thread count are restored), so a
build gives the same weights on every run. The explained examples are held-out ones the
model gets right: ``target`` is the label and the model's prediction.

    task = build_task("lm_recall")
    relevance = explain_relevance(task, mode="default")       # shaped like task.relevant
    scores = ground_truth_scores(relevance, task.relevant, task.mask)
    scores["top_k_hit"].mean(), scores["chance"].mean()
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from ..api import explain

TASKS: tuple[str, ...] = ("lm_recall", "encoder_trigger", "tabular_planted", "image_patch")

Inputs = Tensor | dict[str, Tensor]
Sample = tuple[Inputs, Tensor, Tensor, Tensor | None]  # inputs, labels, relevant, mask


@dataclass
class GroundTruthTask:
    """A trained model, held-out examples it gets right, and their truly relevant inputs."""

    name: str  # one of TASKS
    kind: str  # "causal_lm" | "classifier" | "tabular" | "image"
    model: nn.Module  # trained, eval mode, float64
    inputs: Inputs  # the n examples to explain (model keyword arguments for text)
    target: Tensor  # [n] label = the model's prediction (a token id for the LM)
    relevant: Tensor  # bool, shaped like the per-feature relevance
    accuracy: float  # held-out accuracy of the trained model (float64)
    info: dict[str, Any] = field(default_factory=dict)
    mask: Tensor | None = None  # features that exist (False: padding), like ``relevant``


# -- data ----------------------------------------------------------------------------------
LM_LEN, LM_FILLERS, LM_VALUES = 24, 32, 8
LM_MARK, LM_QUERY = LM_FILLERS, LM_FILLERS + 1
LM_VALUE0 = LM_FILLERS + 2
LM_VOCAB = LM_VALUE0 + LM_VALUES  # 42

ENC_LEN, ENC_VOCAB = 16, 32
ENC_PAD, ENC_CLS, ENC_A, ENC_B, ENC_FILLER0 = 0, 1, 2, 3, 4

TAB_FEATURES, TAB_INFORMATIVE = 20, 4

IMG_SIZE, IMG_PATCH, IMG_AMPLITUDE = 16, 4, 2.0

#: quick builds stop once validation accuracy reaches ``_Spec.stop_at`` and the validation
#: cross-entropy is at most this (a confident model, not one that barely separates)
STOP_LOSS = 0.1


def _recall_data(n: int, gen: torch.Generator, informative: Tensor | None = None) -> Sample:
    """Filler (value tokens included as distractors), ``MARK v`` early, ``QUERY`` last."""
    ids = torch.randint(0, LM_FILLERS + LM_VALUES, (n, LM_LEN), generator=gen)
    ids = torch.where(ids >= LM_FILLERS, ids + 2, ids)  # skip MARK and QUERY
    quarter = LM_LEN // 4
    mark = torch.randint(1, LM_LEN - quarter - 1, (n,), generator=gen)  # value <= 3/4 - 1
    value = torch.randint(LM_VALUE0, LM_VOCAB, (n,), generator=gen)
    rows = torch.arange(n)
    ids[rows, mark], ids[rows, mark + 1], ids[:, -1] = LM_MARK, value, LM_QUERY
    relevant = torch.zeros(n, LM_LEN, dtype=torch.bool)
    relevant[rows, mark] = relevant[rows, mark + 1] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, value, relevant, None


def _trigger_data(n: int, gen: torch.Generator, informative: Tensor | None = None) -> Sample:
    """``[CLS]`` + filler with one trigger (A: class 0, B: class 1), right padded."""
    lengths = torch.randint(ENC_LEN // 2, ENC_LEN + 1, (n,), generator=gen)
    ids = torch.randint(ENC_FILLER0, ENC_VOCAB, (n, ENC_LEN), generator=gen)
    where = 1 + (torch.rand(n, generator=gen, dtype=torch.float64) * (lengths - 1)).long()
    label = torch.randint(0, 2, (n,), generator=gen)
    rows = torch.arange(n)
    ids[:, 0], ids[rows, where] = ENC_CLS, ENC_A + label
    mask = torch.arange(ENC_LEN) < lengths[:, None]
    ids = ids.masked_fill(~mask, ENC_PAD)
    relevant = torch.zeros(n, ENC_LEN, dtype=torch.bool)
    relevant[rows, where] = True
    return {"input_ids": ids, "attention_mask": mask.long()}, label, relevant, mask


def _tabular_data(n: int, gen: torch.Generator, informative: Tensor | None = None) -> Sample:
    """Standard-normal features; the label reads the ``informative`` columns only."""
    x = torch.randn(n, TAB_FEATURES, generator=gen)
    a, b, c, d = informative.tolist()
    label = (x[:, a] + x[:, b] - x[:, c] - x[:, d] > 0).long()
    relevant = torch.zeros(n, TAB_FEATURES, dtype=torch.bool)
    relevant[:, informative] = True
    return x, label, relevant, None


def _patch_data(n: int, gen: torch.Generator, informative: Tensor | None = None) -> Sample:
    """Noise images with a 4×4 stripe patch: horizontal (class 0) or vertical (class 1)."""
    x = torch.randn(n, 1, IMG_SIZE, IMG_SIZE, generator=gen)
    top = torch.randint(0, IMG_SIZE - IMG_PATCH + 1, (n,), generator=gen)
    left = torch.randint(0, IMG_SIZE - IMG_PATCH + 1, (n,), generator=gen)
    label = torch.randint(0, 2, (n,), generator=gen)
    stripes = IMG_AMPLITUDE * (1 - 2 * (torch.arange(IMG_PATCH) % 2)).float()
    patterns = torch.stack([stripes[:, None].expand(-1, IMG_PATCH),
                            stripes[None, :].expand(IMG_PATCH, -1)])
    step = torch.arange(IMG_PATCH)
    rows = (top[:, None, None] + step[None, :, None]).expand(-1, -1, IMG_PATCH)
    cols = (left[:, None, None] + step[None, None, :]).expand(-1, IMG_PATCH, -1)
    batch = torch.arange(n)[:, None, None].expand_as(rows)
    x[batch, 0, rows, cols] = patterns[label]
    relevant = torch.zeros(n, 1, IMG_SIZE, IMG_SIZE, dtype=torch.bool)
    relevant[batch, 0, rows, cols] = True
    return x, label, relevant, None


# -- models --------------------------------------------------------------------------------
def _recall_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=LM_VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=LM_LEN, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _trigger_model() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=ENC_VOCAB, hidden_size=32, intermediate_size=64,
                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=ENC_LEN,
                     type_vocab_size=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     pad_token_id=ENC_PAD)
    cfg.num_labels = 2
    return BertForSequenceClassification(cfg)


def _tabular_model() -> nn.Module:
    return nn.Sequential(nn.Linear(TAB_FEATURES, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 2))


def _patch_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 2))


@dataclass(frozen=True)
class _Spec:
    kind: str
    sample: Callable[..., Sample]
    make_model: Callable[[], nn.Module]
    steps: int  # full budget (quick: stop at the first check reaching ``stop_at``)
    lr: float
    batch: int = 128
    stop_at: float = 0.98
    description: str = ""


_SPECS: dict[str, _Spec] = {
    "lm_recall": _Spec("causal_lm", _recall_data, _recall_model, 300, 5e-3,
                       description="next token after QUERY = the value v of the one MARK v "
                                   "pair (positions 1-17 of 24); relevant: MARK and v"),
    "encoder_trigger": _Spec("classifier", _trigger_data, _trigger_model, 300, 3e-3,
                             description="class = which trigger (A/B) appears, once, at a "
                                         "random real position; relevant: the trigger"),
    "tabular_planted": _Spec("tabular", _tabular_data, _tabular_model, 1500, 3e-3, 256,
                             description="y = [x_a + x_b - x_c - x_d > 0] over 20 N(0,1) "
                                         "features; relevant: a, b, c, d"),
    "image_patch": _Spec("image", _patch_data, _patch_model, 400, 5e-3,
                         description="4x4 +-2 stripes in 16x16 N(0,1) noise: horizontal = 0, "
                                     "vertical = 1; relevant: the 16 patch pixels"),
}


# -- training ------------------------------------------------------------------------------
@contextlib.contextmanager
def _isolated(seed: int) -> Iterator[None]:
    """One thread and a seeded global RNG (for weight init), both restored on exit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


def _gen(seed: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000 + stream)


def _logits(kind: str, model: nn.Module, inputs: Inputs) -> Tensor:
    """The logits the task's target indexes: ``[n, classes]`` (the LM's last position)."""
    if kind == "causal_lm":
        return model(**cast(dict, inputs)).logits[:, -1]
    if kind == "classifier":
        return model(**cast(dict, inputs)).logits
    return model(inputs)


def _take(inputs: Inputs, rows: Tensor) -> Inputs:
    if isinstance(inputs, dict):
        return {k: v[rows] for k, v in inputs.items()}
    return inputs[rows]


def _as_double(inputs: Inputs) -> Inputs:
    if isinstance(inputs, dict):
        return inputs
    return inputs.double()


def _predict(kind: str, model: nn.Module, inputs: Inputs) -> Tensor:
    with torch.no_grad():
        return _logits(kind, model, inputs).argmax(-1)


def _validate(spec: _Spec, model: nn.Module, val: Sample) -> tuple[float, float]:
    """Accuracy and mean cross-entropy on the validation set (eval mode, no grad)."""
    model.eval()
    with torch.no_grad():
        logits = _logits(spec.kind, model, val[0])
    model.train()
    return ((logits.argmax(-1) == val[1]).double().mean().item(),
            nn.functional.cross_entropy(logits, val[1]).item())


def _train(spec: _Spec, model: nn.Module, seed: int, informative: Tensor | None,
           quick: bool) -> dict[str, Any]:
    """AdamW, linear warm-up then cosine decay, fresh synthetic batches every step."""
    gen = _gen(seed, 1)
    val = spec.sample(512, _gen(seed, 2), informative)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=1e-4)
    warm = max(spec.steps // 10, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (
        1 + math.cos(math.pi * min(s / spec.steps, 1.0)))))
    start, step = time.perf_counter(), 0
    model.train()
    for step in range(1, spec.steps + 1):
        x, y, _, _ = spec.sample(spec.batch, gen, informative)
        loss = nn.functional.cross_entropy(_logits(spec.kind, model, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if quick and step % 25 == 0:
            acc, val_loss = _validate(spec, model, val)
            if acc >= spec.stop_at and val_loss <= STOP_LOSS:
                break
    seconds = time.perf_counter() - start
    acc, val_loss = _validate(spec, model, val)
    model.eval()
    return {"train_seconds": seconds, "steps": step, "val_accuracy_float32": acc,
            "val_loss_float32": val_loss}


def _held_out(spec: _Spec, model: nn.Module, seed: int, informative: Tensor | None,
              n_explain: int) -> tuple[float, Sample, int]:
    """Accuracy on a fresh held-out pool; its first ``n_explain`` correctly predicted rows."""
    pool = max(4 * n_explain, 1024)
    x, y, relevant, mask = spec.sample(pool, _gen(seed, 3), informative)
    x = _as_double(x)
    correct = _predict(spec.kind, model, x) == y
    keep = torch.nonzero(correct).flatten()[:n_explain]
    if len(keep) < n_explain:
        raise RuntimeError(f"only {len(keep)} of {pool} held-out examples are predicted "
                           f"correctly; {n_explain} requested")
    chosen = (_take(x, keep), y[keep], relevant[keep], None if mask is None else mask[keep])
    return correct.double().mean().item(), chosen, pool


def build_task(name: str, *, n_explain: int = 64, seed: int = 0,
               quick: bool = False) -> GroundTruthTask:
    """Train the task's model (same ``seed``: same weights) and pick ``n_explain`` held-out
    examples it predicts correctly. ``quick`` stops training at the first check (every 25
    steps) where 512 validation examples reach 98 % accuracy with a cross-entropy of at most
    :data:`STOP_LOSS`; otherwise the full budget runs."""
    if name not in _SPECS:
        raise ValueError(f"unknown task {name!r}; one of {TASKS}")
    spec = _SPECS[name]
    with _isolated(seed):
        informative = None
        if name == "tabular_planted":
            informative = torch.randperm(TAB_FEATURES, generator=_gen(seed, 0))[:TAB_INFORMATIVE]
        model = spec.make_model()
        info = _train(spec, model, seed, informative, quick)
        model = model.double().eval()
        accuracy, (x, y, relevant, mask), pool = _held_out(spec, model, seed, informative,
                                                           n_explain)
    valid = relevant.new_ones(relevant.shape) if mask is None else mask
    info.update(description=spec.description, seed=seed, quick=quick, held_out=pool,
                chance=(relevant.sum() / valid.sum()).item(),
                parameters=sum(p.numel() for p in model.parameters()))
    if informative is not None:
        info["informative"] = sorted(informative.tolist())
    return GroundTruthTask(name, spec.kind, model, x, y, relevant, accuracy, info, mask)


# -- scoring -------------------------------------------------------------------------------
def ground_truth_scores(relevance: Tensor, relevant: Tensor, mask: Tensor | None = None, *,
                        absolute: bool = False) -> dict[str, Tensor]:
    """Per example (dimension 0; the rest are features), with ``mask`` False features left out:

    - ``top_k_hit``: share of the k highest-ranked features that are relevant, k = number of
      relevant features (precision@k);
    - ``top1``: 1.0 if the highest-ranked feature is relevant, else 0.0;
    - ``mass``: share of the positive relevance on relevant features (0 when none is
      positive); ``mass_abs``: the same for |relevance|;
    - ``chance``: k / number of features, what a uniformly random ranking scores on average
      on ``top_k_hit`` and ``top1`` (and an even spread on ``mass``);
    - ``k``: the number of relevant features.

    Ranking is by signed value, most positive first (``absolute``: by |relevance|, for
    evidence either way); ties go to the lower (flattened) index. Rows without relevant
    features get NaN for ``top_k_hit`` and ``top1``. ``mask`` is shaped like (or broadcasts
    to) ``relevance``; relevance must be finite where it is True (anything, e.g. NaN, is
    allowed on padding).
    """
    n = relevance.shape[0]
    if relevant.shape != relevance.shape:
        raise ValueError(f"relevant {tuple(relevant.shape)} is not shaped like relevance "
                         f"{tuple(relevance.shape)}")
    r = relevance.detach().reshape(n, -1).double()
    valid = (torch.ones_like(r, dtype=torch.bool) if mask is None
             else mask.bool().expand(relevance.shape).reshape(n, -1))
    if not torch.isfinite(r[valid]).all():
        raise ValueError("relevance is not finite on a feature the mask keeps")
    hit = relevant.reshape(n, -1).bool() & valid
    key = (r.abs() if absolute else r).masked_fill(~valid, -math.inf)  # after kept ones
    k = hit.sum(1)
    ranked = hit.gather(1, key.sort(dim=1, descending=True, stable=True).indices)
    in_top = torch.arange(r.shape[1])[None] < k[:, None]
    none = torch.tensor(math.nan, dtype=torch.float64)
    top_k = torch.where(k > 0, (ranked & in_top).sum(1) / k.clamp(min=1), none)
    top1 = torch.where(k > 0, ranked[:, 0].double(), none)
    r = r.masked_fill(~valid, 0.0)
    return {"top_k_hit": top_k, "top1": top1,
            "mass": _share(r.clamp(min=0), hit), "mass_abs": _share(r.abs(), hit),
            "chance": k / valid.sum(1).clamp(min=1), "k": k}


def _share(weights: Tensor, on: Tensor) -> Tensor:
    total = weights.sum(1)
    return torch.where(total > 0, (weights * on).sum(1) / total.clamp(min=1e-300),
                       torch.zeros_like(total))


def explain_relevance(task: GroundTruthTask, mode: str = "default", **kwargs: Any) -> Tensor:
    """``dlb.explain`` of ``task.target`` on ``task.inputs``: the input relevance, shaped like
    ``task.relevant`` (per token for text: ``inputs["input_ids"]``). ``kwargs`` go to
    :func:`dlbhooks.explain` (``saturation``, ``multiplier`` ...)."""
    exp = explain(task.model, task.inputs, target=task.target, mode=mode, **kwargs)
    if isinstance(task.inputs, dict):
        return exp.inputs["input_ids"]
    (relevance,) = exp.inputs.values()
    return relevance
