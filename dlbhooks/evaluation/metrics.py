"""Metrics of attribution quality, for any model and any attribution, vectorised over a batch.

*Features* are what a metric removes or ranks: each entry of a tensor input (tabular
columns, image pixels per channel), image patches with ``unit=(ph, pw)`` (the relevance
summed over the patch and the channels), or the real tokens of a token input (padding,
``attention_mask`` 0, is never removed and never counted). Relevance is given shaped like
the input (``[B, T]`` for tokens). A metric's *score* is :func:`~.attributions.score`:
the target's probability (``metric="prob"``) or logit (``"logit"``), read at ``position``
for sequence outputs ``[B, T, V]``.

What a removed feature becomes, ``replace``:

- a tensor input: a value or a tensor broadcastable to the input (a training mean, the
  image mean, a blurred copy of the batch);
- token inputs: a token id (mask, pad, unk; or ids broadcastable to ``[B, T]``), or
  ``"delete"``: the removed tokens are dropped and each row's kept tokens are packed to
  the right in their order; the freed slots on the left get ``attention_mask`` 0 and the
  id ``model.config.pad_token_id`` (0 without one); every other ``[B, T]`` input
  (``token_type_ids``, ``position_ids``) is moved with its tokens, and when the inputs
  have no ``position_ids`` but the model's forward accepts them, ``position_ids =
  max(cumsum(attention_mask) - 1, 0)`` are passed so that absolute-position models see
  the kept tokens at 0, 1, ... The score is read at the last slot (``position`` must be
  -1): the last kept token. A row with every token deleted is scored on its all-masked
  input (whatever the model computes for an empty context).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..api import call_model
from ..results import Explanation
from .attributions import (
    Attribution,
    as_target,
    is_token_input,
    rows_of,
    score,
    token_mask,
)

__all__ = [
    "ABPC", "Curve", "abpc", "average_ranks", "complexity", "conservation_report",
    "faithfulness_correlation", "max_sensitivity", "mprt", "pearson",
    "perturbation_curve", "randomisation_check", "sparseness", "spearman",
]


@dataclass
class Curve:
    """A perturbation curve: ``values[b, k]`` is row ``b``'s score after removing the
    fraction ``fractions[k]`` of its features; ``auc`` the trapezoid area over [0, 1]."""

    fractions: Tensor  # [S + 1]
    values: Tensor  # [B, S + 1]
    auc: Tensor  # [B]


class ABPC(NamedTuple):
    """Area between the perturbation curves: ``delta = lerf.auc - morf.auc`` ``[B]``."""

    delta: Tensor
    morf: Curve
    lerf: Curve


# -- features ------------------------------------------------------------------------------
@dataclass
class _Features:
    """The perturbable features of a batch: ``valid [B, F]``, and for patches the patch id
    of each pixel ``patch [H*W]``."""

    inputs: Any
    valid: Tensor
    tokens: bool
    patch: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.valid.device


def _features(inputs: Any, unit: tuple[int, int] | None) -> _Features:
    if is_token_input(inputs):
        if unit is not None:
            raise ValueError("unit= (patches) is for image inputs, not tokens")
        inputs = dict(inputs)
        return _Features(inputs, token_mask(inputs), True)
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        raise TypeError("inputs must be a float tensor [B, ...] or a dict with input_ids")
    n, dev = len(inputs), inputs.device
    if unit is None:
        return _Features(inputs, torch.ones(n, inputs[0].numel(), dtype=torch.bool,
                                            device=dev), False)
    if inputs.dim() < 3:
        raise ValueError("unit= (patches) needs images [B, (C,) H, W]")
    ph, pw = unit
    h, w = inputs.shape[-2:]
    cols = -(-w // pw)
    patch = ((torch.arange(h, device=dev) // ph)[:, None] * cols
             + (torch.arange(w, device=dev) // pw)[None, :]).reshape(-1)
    count = int(patch.max()) + 1
    return _Features(inputs, torch.ones(n, count, dtype=torch.bool, device=dev), False, patch)


def _reduce(space: _Features, relevance: Tensor) -> Tensor:
    """Relevance per feature ``[B, F]`` (padding 0; patches: summed)."""
    r = torch.as_tensor(relevance).to(space.device)
    n = len(space.valid)
    if space.tokens:
        shape = tuple(space.valid.shape)
        if tuple(r.shape[:2]) != shape:
            raise ValueError(f"token relevance must be [B, T] = {list(shape)}, got "
                             f"{list(r.shape)}")
        return r.reshape(*shape, -1).sum(-1).masked_fill(~space.valid, 0)
    x = space.inputs
    if space.patch is None:
        if r.shape != x.shape:
            raise ValueError(f"relevance {list(r.shape)} must be shaped like the input "
                             f"{list(x.shape)}")
        return r.reshape(n, -1)
    h, w = x.shape[-2:]
    if r.shape != x.shape and tuple(r.shape) != (n, h, w):
        raise ValueError(f"relevance must be shaped like the input or [B, H, W], got "
                         f"{list(r.shape)}")
    pixels = r.reshape(n, -1, h * w).sum(1)
    out = torch.zeros(n, space.valid.shape[1], dtype=r.dtype, device=r.device)
    return out.index_add_(1, space.patch, pixels)


def _perturb(space: _Features, rows: Tensor, removed: Tensor, replace: Any,
             model: nn.Module) -> Any:
    """The model inputs of rows ``rows`` with the features ``removed [N, F]`` replaced."""
    if space.tokens:
        return _perturb_tokens(space, rows, removed, replace, model)
    if isinstance(replace, str):
        raise ValueError(f"replace={replace!r} is for token inputs; give a value or a "
                         "tensor broadcastable to the input")
    x = space.inputs
    xr = x[rows]
    if space.patch is None:
        mask = removed.view(xr.shape)
    else:
        h, w = x.shape[-2:]
        mask = removed[:, space.patch].view(len(rows), *[1] * (x.dim() - 3), h, w)
    rep = torch.as_tensor(replace, dtype=x.dtype, device=x.device)
    return torch.where(mask, torch.broadcast_to(rep, x.shape)[rows], xr)


def _perturb_tokens(space: _Features, rows: Tensor, removed: Tensor, replace: Any,
                    model: nn.Module) -> dict:
    inputs = space.inputs
    n = len(space.valid)
    sub = {k: rows_of(v, n, rows) for k, v in inputs.items()}
    keep = space.valid[rows]
    removed = removed & keep
    if isinstance(replace, str):
        if replace != "delete":
            raise ValueError(f"replace must be a token id or 'delete', not {replace!r}")
        return _delete(sub, keep & ~removed, model)
    ids = inputs["input_ids"]
    rep = torch.broadcast_to(torch.as_tensor(replace, dtype=ids.dtype, device=ids.device),
                             ids.shape)[rows]
    sub["input_ids"] = torch.where(removed, rep, sub["input_ids"])
    return sub


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _delete(sub: dict, keep: Tensor, model: nn.Module) -> dict:
    """Drop the tokens not in ``keep``, pack the rest to the right (module docstring)."""
    perm = torch.sort(keep.long(), dim=1, stable=True).indices  # dropped first, order kept
    out = {}
    for k, v in sub.items():
        if isinstance(v, Tensor) and v.dim() >= 2 and v.shape[:2] == keep.shape:
            index = perm.view(*perm.shape, *[1] * (v.dim() - 2)).expand_as(v)
            v = v.gather(1, index)
        out[k] = v
    kept = keep.gather(1, perm)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    out["input_ids"] = out["input_ids"].masked_fill(~kept, 0 if pad is None else int(pad))
    mask = sub.get("attention_mask")
    out["attention_mask"] = kept.to(mask.dtype if mask is not None else torch.long)
    if "position_ids" not in out and _accepts(model, "position_ids"):
        out["position_ids"] = (kept.long().cumsum(1) - 1).clamp_min(0)
    return out


def _evaluate(model: nn.Module, space: _Features, replace: Any, target: Tensor, metric: str,
              position: Any, total: int, plan: Callable[[Tensor], tuple[Tensor, Tensor]],
              batch_size: int) -> Tensor:
    """Scores of ``total`` perturbed rows, ``batch_size`` per forward: ``plan(indices)``
    gives each one's source row and removed features."""
    if isinstance(replace, str) and not (isinstance(position, int) and position == -1):
        raise ValueError("replace='delete' packs the kept tokens to the right: position "
                         "must be -1 (the last kept token)")
    n = len(space.valid)
    out = []
    for start in range(0, total, batch_size):
        idx = torch.arange(start, min(total, start + batch_size), device=space.device)
        rows, removed = plan(idx)
        inputs = _perturb(space, rows, removed, replace, model)
        out.append(score(model, inputs, target[rows], metric, rows_of(position, n, rows)))
    return torch.cat(out)


def _ranks(rel: Tensor, valid: Tensor, order: str) -> Tensor:
    """Each feature's place in the removal order (0 first): MoRF by decreasing, LeRF by
    increasing relevance, ties by index; padding after every real feature."""
    if order not in ("morf", "lerf"):
        raise ValueError(f"order must be 'morf' or 'lerf', not {order!r}")
    if torch.isnan(rel).any():
        raise ValueError("relevance has NaN values")
    idx = torch.sort(rel, dim=1, descending=order == "morf", stable=True).indices
    real_first = torch.sort(valid.gather(1, idx).long(), dim=1, descending=True,
                            stable=True).indices
    idx = idx.gather(1, real_first)
    places = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
    return torch.empty_like(idx).scatter_(1, idx, places)


# -- perturbation curves ---------------------------------------------------------------------
@torch.no_grad()
def perturbation_curve(model: nn.Module, inputs: Any, relevance: Tensor, target: Any, *,
                       order: str = "morf", steps: int | None = None, replace: Any,
                       metric: str = "prob", position: Any = -1,
                       unit: tuple[int, int] | None = None, batch_size: int = 256) -> Curve:
    """The score as features are removed cumulatively in order of relevance (``"morf"``:
    most relevant first; ``"lerf"``: least relevant first; ties by feature index).

    With ``S = steps`` (default: the largest number of features of a row, one feature
    per step), point ``k = 0..S`` removes the first ``floor(k·n_b/S)`` features of row
    ``b`` (``n_b`` its real features), at fraction ``k/S``; point 0 is the unperturbed
    score. ``auc``: trapezoid rule over the fractions, ``Σ_k (v_k + v_{k+1}) / (2S)``.
    ``batch_size``: perturbed rows per forward.
    """
    space = _features(inputs, unit)
    rel = _reduce(space, relevance)
    rank = _ranks(rel, space.valid, order)
    n = space.valid.sum(1)
    s = int(n.max()) if steps is None else int(steps)
    if s < 1:
        raise ValueError("nothing to remove: steps and the number of features must be >= 1")
    k = torch.arange(s + 1, device=space.device)
    counts = k[None, :] * n[:, None] // s  # [B, S + 1]
    rows = len(rel)
    target = as_target(target, rows, space.device)

    def plan(idx: Tensor) -> tuple[Tensor, Tensor]:
        b, j = idx // (s + 1), idx % (s + 1)
        return b, rank[b] < counts[b, j, None]

    values = _evaluate(model, space, replace, target, metric, position, rows * (s + 1), plan,
                       batch_size).view(rows, s + 1)
    fractions = k.to(values.dtype) / s
    return Curve(fractions, values, torch.trapezoid(values, fractions, dim=-1))


def abpc(model: nn.Module, inputs: Any, relevance: Tensor, target: Any, **kw: Any) -> ABPC:
    """Area between the perturbation curves, ``ΔAUC = AUC(LeRF) - AUC(MoRF)`` ``[B]``
    (larger: the ranking separates helpful from useless features better), with both
    curves; ``kw`` go to :func:`perturbation_curve` (``replace`` is required)."""
    morf = perturbation_curve(model, inputs, relevance, target, order="morf", **kw)
    lerf = perturbation_curve(model, inputs, relevance, target, order="lerf", **kw)
    return ABPC(lerf.auc - morf.auc, morf, lerf)


@torch.no_grad()
def faithfulness_correlation(model: nn.Module, inputs: Any, relevance: Tensor, target: Any, *,
                             subset_size: int, n_subsets: int = 50, replace: Any,
                             seed: int = 0, metric: str = "prob", position: Any = -1,
                             unit: tuple[int, int] | None = None,
                             batch_size: int = 256) -> Tensor:
    """Faithfulness correlation (Bhatt et al. 2020), ``[B]``: the Pearson correlation, over
    ``n_subsets`` random subsets ``S`` of ``min(subset_size, n_b)`` real features of row
    ``b``, between the relevance ``S`` carries, ``Σ_{i∈S} r_i``, and the drop of the score
    when ``S`` is replaced, ``f(x) - f(x_S→replace)``. The subsets are drawn from
    ``seed`` (uniform without replacement); all of a row's subsets are scored in batches of
    ``batch_size`` rows. NaN when either side is constant."""
    space = _features(inputs, unit)
    rel = _reduce(space, relevance)
    rows, count = rel.shape
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(rows, n_subsets, count, generator=gen, dtype=torch.float64)
    keys = keys.to(space.device).masked_fill(~space.valid[:, None], 2.0)
    idx = keys.argsort(-1)
    places = torch.arange(count, device=space.device).expand_as(idx)
    rank = torch.empty_like(idx).scatter_(-1, idx, places)
    size = space.valid.sum(1).clamp(max=subset_size)
    chosen = rank < size[:, None, None]  # [B, K, F]
    carried = (rel[:, None, :] * chosen).sum(-1)
    target = as_target(target, rows, space.device)
    nothing = torch.zeros_like(space.valid)
    base = _evaluate(model, space, replace, target, metric, position, rows,
                     lambda i: (i, nothing[i]), batch_size)

    def plan(i: Tensor) -> tuple[Tensor, Tensor]:
        b, j = i // n_subsets, i % n_subsets
        return b, chosen[b, j]

    after = _evaluate(model, space, replace, target, metric, position, rows * n_subsets,
                      plan, batch_size).view(rows, n_subsets)
    return pearson(carried, base[:, None] - after)


# -- explanation shape -----------------------------------------------------------------------
def _flat_abs(relevance: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    a = torch.as_tensor(relevance)
    a = (a if a.is_floating_point() else a.to(torch.get_default_dtype())).abs()
    a = a.reshape(len(a), -1)
    valid = (torch.ones_like(a, dtype=torch.bool) if mask is None
             else torch.as_tensor(mask, device=a.device).reshape(len(a), -1).bool())
    return a.masked_fill(~valid, 0), valid


def complexity(relevance: Tensor, mask: Tensor | None = None) -> Tensor:
    """Complexity (Bhatt et al. 2020), ``[B]``: the entropy ``-Σ_i p_i ln p_i`` of ``p_i =
    |r_i| / Σ_j |r_j|`` over a row's features (``mask``: the real ones; 0 ln 0 = 0).
    ``ln n`` for a uniform map, 0 for one feature; NaN for an all-zero row."""
    a, _ = _flat_abs(relevance, mask)
    return torch.special.entr(a / a.sum(1, keepdim=True)).sum(1)


def sparseness(relevance: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sparseness (Chalasani et al. 2020), ``[B]``: the Gini index of ``|r|`` over a row's
    ``n`` features (``mask``: the real ones), ``G = Σ_i (2i - n - 1) a_(i) / (n Σ_i a_i)``
    with ``a_(1) <= ... <= a_(n)`` sorted: 0 for a uniform map, ``(n - 1)/n`` for one
    non-zero feature; NaN for an all-zero row."""
    a, valid = _flat_abs(relevance, mask)
    n = valid.sum(1, keepdim=True)
    s = a.masked_fill(~valid, -1).sort(1).values.clamp_min(0)  # padding first, as 0
    i = torch.arange(1, a.shape[1] + 1, device=a.device) - (a.shape[1] - n)
    return ((2 * i - n - 1) * s).sum(1) / (n[:, 0] * s.sum(1))


def _float(x: Tensor) -> Tensor:
    x = torch.as_tensor(x)
    x = x if x.is_floating_point() else x.to(torch.get_default_dtype())
    return x.reshape(len(x), -1)


def _row_mask(mask: Tensor | None, like: Tensor) -> Tensor | None:
    return None if mask is None else torch.as_tensor(mask, device=like.device).reshape(
        len(like), -1).bool()


def pearson(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Pearson correlation of each row pair, flattened, ``[B]``: ``Σ a'b' / sqrt(Σ a'² Σ
    b'²)`` with ``a' = a - mean(a)``; over the features where ``mask`` is true, if given
    (e.g. the real tokens). NaN if one side is constant."""
    a, b = _float(a), _float(b)
    m = _row_mask(mask, a)
    if m is None:
        m = torch.ones_like(a, dtype=torch.bool)
    n = m.sum(1, keepdim=True)
    a = (a - a.masked_fill(~m, 0).sum(1, keepdim=True) / n).masked_fill(~m, 0)
    b = (b - b.masked_fill(~m, 0).sum(1, keepdim=True) / n).masked_fill(~m, 0)
    return (a * b).sum(1) / ((a * a).sum(1) * (b * b).sum(1)).sqrt()


def average_ranks(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Ranks 1..n of each row's flattened values, ties getting their average rank
    (``mask``: only the true features are ranked, 1..n_b; the others get ranks above)."""
    x = _float(x)
    m = _row_mask(mask, x)
    if m is not None:
        x = x.masked_fill(~m, float("inf"))
    values, idx = torch.sort(x, dim=1, stable=True)
    new = torch.ones_like(values, dtype=torch.bool)
    new[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new.long().cumsum(1) - 1
    places = torch.arange(x.shape[1], dtype=x.dtype, device=x.device).expand_as(x)
    first = torch.zeros_like(x).scatter_reduce(1, group, places, "amin", include_self=False)
    last = torch.zeros_like(x).scatter_reduce(1, group, places, "amax", include_self=False)
    ranked = (first + last).gather(1, group) / 2 + 1
    return torch.empty_like(x).scatter_(1, idx, ranked)


def spearman(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Spearman rank correlation of each row pair, flattened, ``[B]``: the Pearson
    correlation of the average ranks (:func:`average_ranks`), over the features where
    ``mask`` is true, if given."""
    return pearson(average_ranks(a, mask), average_ranks(b, mask), mask)


def _similarity(similarity: str | Callable[[Tensor, Tensor], Tensor]) -> Callable:
    """``sim(a, b, mask)``: a built-in one restricted to ``mask``; a callable of the
    user's gets ``(a, b)`` only."""
    if callable(similarity):
        return lambda a, b, mask=None: similarity(a, b)
    known = {"spearman": spearman, "pearson": pearson}
    if similarity not in known:
        raise ValueError(f"similarity must be one of {sorted(known)} or a callable")
    return known[similarity]


# -- robustness --------------------------------------------------------------------------------
def _continuous_input(inputs: Any, what: str) -> Tensor:
    if is_token_input(inputs) or not isinstance(inputs, Tensor) or \
            not inputs.is_floating_point():
        raise TypeError(f"{what} adds noise to the input: it needs a float tensor input "
                        "(token ids cannot be perturbed continuously)")
    return inputs


def max_sensitivity(attribute: Attribution, model: nn.Module, inputs: Tensor, target: Any, *,
                    radius: float, n_samples: int = 10, seed: int = 0) -> Tensor:
    """Max-sensitivity (Yeh et al. 2019), ``[B]``: ``max_s ||a(x + δ_s) - a(x)|| /
    ||a(x)||`` (Frobenius norms per row) over ``n_samples`` draws ``δ_s`` uniform in the
    L∞ ball of ``radius``: ``δ_s = radius·(2u - 1)``, ``u = torch.rand(x.shape)`` drawn in
    turn from a CPU generator seeded with ``seed``, in ``x``'s dtype."""
    x = _continuous_input(inputs, "max_sensitivity")
    n = len(x)
    base = attribute(model, x, target)
    norm = base.reshape(n, -1).norm(dim=1)
    gen = torch.Generator().manual_seed(seed)
    worst = torch.zeros_like(norm)
    for _ in range(n_samples):
        u = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        a = attribute(model, x + radius * (2 * u - 1), target)
        worst = torch.maximum(worst, (a - base).reshape(n, -1).norm(dim=1) / norm)
    return worst


def mprt(attribute: Attribution, model: nn.Module, inputs: Tensor, target: Any, *,
         noise_levels: Any, threshold: float = 0.5,
         similarity: str | Callable[[Tensor, Tensor], Tensor] = "spearman",
         n_samples: int = 1, scale: Any = None, seed: int = 0) -> Tensor:
    """Maximal Perturbation Robustness Test, ``[B]``: the largest input noise before the
    explanation changes significantly.

    For increasing levels ``σ_1 < ... < σ_L`` (``noise_levels``), the noisy inputs are
    ``x + σ_l·s⊙z`` with ``s`` the feature's standard deviation over the batch
    (``scale``, if given: a value or a tensor broadcastable to the input) and ``z ~
    N(0, 1)`` (``n_samples`` draws from ``seed``, the same ``z`` at every level);
    ``sim_l`` is the mean over the draws of ``similarity(a(noisy), a(x))`` per row. The
    result is ``σ_m`` for the largest ``m`` with ``sim_1, ..., sim_m >= threshold`` (the
    explanation stays similar up to ``σ_m``), 0 when ``sim_1 < threshold``.
    """
    x = _continuous_input(inputs, "mprt")
    levels = torch.as_tensor(noise_levels, dtype=x.dtype, device=x.device).reshape(-1)
    if len(levels) == 0 or (levels <= 0).any() or (levels[1:] <= levels[:-1]).any():
        raise ValueError("noise_levels must be positive and increasing")
    if scale is None:
        if len(x) < 2:
            raise ValueError("the feature's std over the batch needs 2 rows or more: pass "
                             "scale=")
        scale = x.std(0, correction=0)
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    sim = _similarity(similarity)
    base = attribute(model, x, target)
    gen = torch.Generator().manual_seed(seed)
    noise = [torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device) * scale
             for _ in range(n_samples)]
    sims = torch.stack([
        torch.stack([sim(attribute(model, x + level * z, target), base) for z in noise]).mean(0)
        for level in levels])  # [L, B]
    stays = (sims >= threshold).long().cumprod(0).sum(0)
    return torch.cat([levels.new_zeros(1), levels])[stays]


# -- sanity check -----------------------------------------------------------------------------
def _output_first(model: nn.Module, inputs: Any) -> list[tuple[str, nn.Module]]:
    """The modules with parameters of their own, by when their forward ends (last
    first) in one forward on ``inputs``; modules not called are left out."""
    seen: dict[str, nn.Module] = {}
    handles = []

    def hook(name: str) -> Callable:
        def note(module: nn.Module, args: Any, output: Any) -> None:
            seen.setdefault(name, module)  # (returns None: the output is kept)
        return note

    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return list(seen.items())[::-1]


@torch.no_grad()
def _randomise(module: nn.Module, gen: torch.Generator) -> None:
    """Each float parameter of the module's own ← Gaussian noise with the standard
    deviation of its entries (1 where they are all equal)."""
    for p in module.parameters(recurse=False):
        if not p.is_floating_point():
            continue
        sd = float(p.double().std(correction=0)) if p.numel() > 1 else 0.0
        sd = sd if sd > 0 else 1.0
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype).to(p) * sd)


def randomisation_check(attribute: Attribution, model: nn.Module, inputs: Any, target: Any, *,
                        similarity: str | Callable[[Tensor, Tensor], Tensor] = "spearman",
                        seed: int = 0, absolute: bool = False) -> tuple[list[str], Tensor]:
    """Model-parameter randomisation sanity check (Adebayo et al. 2018), cascading.

    On a deep copy of ``model`` (the model itself is untouched), the modules with
    parameters of their own are randomised one after the other from the output side to
    the input (by when their forward ends), cumulatively: each float parameter becomes
    Gaussian noise with the standard deviation of its entries (1 if they are all equal;
    buffers, e.g. batch-norm statistics, are kept), from a generator seeded with ``seed``.
    Returns the names (``"(original)"``, then the module randomised at each row) and
    ``[n_layers + 1, B]``: ``similarity`` (Spearman of the flattened relevance by
    default, over the real tokens for token inputs; of ``|r|`` with ``absolute``)
    between each model's explanation and the original one. Row 0 randomises nothing. An
    explanation that depends on the model should lose its similarity as layers are
    randomised."""
    sim = _similarity(similarity)
    prep = (lambda r: r.abs()) if absolute else (lambda r: r)
    base = prep(attribute(model, inputs, target))
    clone = copy.deepcopy(model)
    layers = _output_first(clone, inputs)
    gen = torch.Generator().manual_seed(seed)
    mask = token_mask(inputs) if is_token_input(inputs) else None  # real tokens only
    rows = [sim(prep(attribute(clone, inputs, target)), base, mask)]
    for _, module in layers:
        _randomise(module, gen)
        rows.append(sim(prep(attribute(clone, inputs, target)), base, mask))
    return ["(original)"] + [name for name, _ in layers], torch.stack(rows)


# -- DLBacktrace's own ledger ------------------------------------------------------------------
def conservation_report(exp: Explanation) -> dict[str, Any]:
    """Where the seeded relevance went, from the ledger: ``{"mode", "conservation_error"
    (:meth:`Explanation.conservation_error`), "streams": {stream: {"seeded", "inputs":
    {input name: share}, "absorbed": {module type: share}, "total"}}}``, one stream
    (``"default"``) or two (``"positive"``, ``"negative"``, each relative to its own seed).
    Shares are fractions of the stream's seeded relevance (the ledger root's relevance
    out); ``absorbed`` sums each call's own absorption by its module type (types that
    absorbed nothing are left out); ``total`` (inputs + absorbed) is 1 when conserved."""
    contrastive = exp.positive is not None and exp.negative is not None
    streams = {"positive": exp.positive, "negative": exp.negative} if contrastive else {
        "default": exp.inputs}
    root = exp.ledger[0]
    report: dict[str, Any] = {"mode": exp.mode,
                              "conservation_error": exp.conservation_error(), "streams": {}}
    for i, (stream, inputs) in enumerate(streams.items()):
        def pick(v: Any, i: int = i) -> float:
            return float(v[i] if isinstance(v, tuple) else v)

        seeded = pick(root.relevance_out)
        share = (lambda v: v / seeded) if seeded else (lambda v: float("nan"))
        absorbed: dict[str, float] = {}
        for e in exp.ledger:
            if pick(e.absorbed):
                absorbed[e.type] = absorbed.get(e.type, 0.0) + pick(e.absorbed)
        absorbed = {k: share(v) for k, v in absorbed.items()}
        to_inputs = {k: share(float(v.double().sum())) for k, v in inputs.items()}
        report["streams"][stream] = {
            "seeded": seeded, "inputs": to_inputs, "absorbed": absorbed,
            "total": sum(to_inputs.values()) + sum(absorbed.values())}
    return report
