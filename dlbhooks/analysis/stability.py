"""How stable is a pruning plan drawn from expert statistics? Per-window expert scores, and
a bootstrap over windows: how often each pruned set is chosen.

    scores = window_scores(model, rows, positions=[31, 63, 95, 127])  # by -> block -> [N, E]
    boot = bootstrap_plans(scores["relevance"], n_drop=2, resamples=200)
    boot.full_share           # share of resamples that choose the all-windows plan
    boot.agreement            # block -> share of resamples choosing that block's full-data set
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..corpus import explain_batch
from .experts import model_order

Plan = tuple[tuple[str, tuple[int, ...]], ...]  # hashable: ((block, dropped ids), ...)


def exp_window_scores(exp, mask: Tensor | None = None) -> dict[str, dict[str, Tensor]]:
    """Per batch row of one explanation: ``{"relevance": {block: [rows, E]}, "frequency":
    {block: [rows, E]}}`` — |relevance| each routed expert carried, summed over the row's
    tokens, and how many of the row's tokens selected it (padding excluded by ``mask``).
    Summed over rows they are :class:`ExpertStats`' ``abs_relevance`` and ``routed``."""
    rel_out: dict[str, Tensor] = {}
    freq_out: dict[str, Tensor] = {}
    for block, rel in exp.experts.items():
        E = sum(name.isdigit() for name in exp.expert_columns(block))
        r = rel.detach().double()[..., :E]  # [rows, tokens, E]
        idx = exp.routing[block][0].long()  # [rows, tokens, k]
        keep = torch.ones(r.shape[:2], dtype=torch.float64, device=r.device) if mask is None \
            else mask.to(r.device).double().reshape(r.shape[:2])
        rel_out[block] = (r.abs() * keep[..., None]).sum(1).cpu()
        hits = torch.zeros(*idx.shape[:2], E, dtype=torch.float64, device=idx.device)
        hits.scatter_add_(2, idx, torch.ones(idx.shape, dtype=torch.float64, device=idx.device))
        freq_out[block] = (hits * keep[..., None].to(hits.device)).sum(1).cpu()
    return {"relevance": rel_out, "frequency": freq_out}


@torch.no_grad()
def window_scores(model: nn.Module, rows: Tensor, positions: Sequence[int], *,
                  batch_size: int = 8, progress: bool = False, **explain_kwargs
                  ) -> dict[str, dict[str, Tensor]]:
    """Expert scores of every window ``rows`` [N, L + 1] (the true next token explained at
    ``positions``): by ("relevance", "frequency") -> block -> [N, E], float64."""
    parts: list[dict[str, dict[str, Tensor]]] = []
    for i in range(0, rows.shape[0], batch_size):
        exps, mask = explain_batch(model, rows[i:i + batch_size], target="next",
                                   positions=list(positions), **explain_kwargs)
        per = [exp_window_scores(e, mask) for e in exps]
        parts.append({by: {b: torch.stack([p[by][b] for p in per]).sum(0) for b in per[0][by]}
                      for by in per[0]})
        if progress:
            print(f"  windows {min(i + batch_size, rows.shape[0])}/{rows.shape[0]}",
                  flush=True)
    blocks = model_order(parts[0]["relevance"])
    return {by: {b: torch.cat([p[by][b] for p in parts]) for b in blocks} for by in parts[0]}


def plan_from_totals(totals: dict[str, Tensor], n_drop: int) -> Plan:
    """The ``n_drop`` lowest-scoring experts of every block (stable ties, as
    :meth:`ExpertStats.ranking`)."""
    return tuple((b, tuple(sorted(torch.argsort(t, stable=True)[:n_drop].tolist())))
                 for b, t in totals.items())


@dataclass
class Bootstrap:
    """Plans chosen on ``resamples`` bootstrap resamples of the windows."""

    full: Plan  # the plan from all windows
    plans: list[Plan]  # each resample's plan, in draw order
    counts: Counter  # plan -> resamples choosing it
    agreement: dict[str, float]  # block -> share of resamples with the full plan's set
    resamples: int
    experts: dict[str, int]  # block -> routed experts

    @property
    def full_share(self) -> float:
        return self.counts.get(self.full, 0) / self.resamples

    def expert_inclusion(self) -> dict[str, Tensor]:
        """Block -> [E]: share of resamples that prune each expert."""
        out = {b: torch.zeros(E, dtype=torch.float64) for b, E in self.experts.items()}
        for plan, n in self.counts.items():
            for block, ids in plan:
                out[block][list(ids)] += n / self.resamples
        return out


def bootstrap_plans(scores: dict[str, Tensor], n_drop: int, resamples: int = 200,
                    seed: int = 0) -> Bootstrap:
    """Resample the N windows with replacement ``resamples`` times; each resample's summed
    scores (block -> [N, E] per window) give a plan. All resamples at once: one
    [resamples, N] count matrix times each block's [N, E] scores."""
    blocks = list(scores)
    N = scores[blocks[0]].shape[0]
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, N, (resamples, N), generator=g)
    weights = torch.zeros(resamples, N, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones(resamples, N, dtype=torch.float64))  # times each window drawn
    totals = {b: weights @ scores[b] for b in blocks}  # [resamples, E]
    full = plan_from_totals({b: s.sum(0) for b, s in scores.items()}, n_drop)
    # every resample's dropped experts per block at once (stable ties, then sorted)
    ids = {b: torch.argsort(t, dim=1, stable=True)[:, :n_drop].sort(dim=1).values.tolist()
           for b, t in totals.items()}
    plans = [tuple((b, tuple(ids[b][r])) for b in blocks) for r in range(resamples)]
    agreement = {b: sum(tuple(row) == ids_full for row in ids[b]) / resamples
                 for b, ids_full in full}
    return Bootstrap(full, plans, Counter(plans), agreement, resamples,
                     {b: s.shape[1] for b, s in scores.items()})


def as_dict(plan: Plan) -> dict[str, list[int]]:
    return {b: list(ids) for b, ids in plan}
