"""Pruning plans from expert statistics, and held-out loss before and after pruning against
frequency- and random-based pruning (``dlbhooks prune --eval``).

    plan = pruning_plan(stats, fraction=0.25, by="relevance")       # block -> expert ids
    ev = evaluate_pruning(model, stats, 0.25, {"code": rows}, chosen="relevance")
    ev.to_markdown(); ev.to_html()
"""

from __future__ import annotations

import html
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..integrations.accelerate import input_device
from ..report import _STYLE, _heatmap
from .experts import ExpertStats
from .pruning import pruned

BY = ("relevance", "frequency", "random")


def experts_to_drop(num_experts: int, fraction: float, top_k: int) -> int:
    """How many experts of a block of ``num_experts`` a ``fraction`` prunes (rounded); a
    ValueError if that is none, or leaves fewer than ``top_k``."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the fraction must be between 0 and 1, got {fraction}")
    n = int(round(fraction * num_experts))
    if n < 1:
        raise ValueError(f"a fraction of {fraction} of {num_experts} experts prunes none")
    if num_experts - n < top_k:
        raise ValueError(f"pruning {n} of {num_experts} experts (fraction {fraction}) leaves "
                         f"{num_experts - n}, fewer than the {top_k} experts each token is "
                         f"routed to (top-k); the largest fraction is "
                         f"{(num_experts - top_k) / num_experts:.3g}")
    return n


def pruning_plan(stats: ExpertStats, n_drop: int, by: str = "relevance",
                 seed: int = 0) -> dict[str, list[int]]:
    """The ``n_drop`` least important experts of every block (block path -> sorted ids):
    by |relevance|, by routing frequency, or at random (``seed``; one draw per block in
    block order)."""
    if by not in BY:
        raise ValueError(f"unknown ranking {by!r}: one of {', '.join(BY)}")
    if by == "random":
        r = random.Random(seed)
        return {layer: sorted(r.sample(range(n), n_drop))
                for layer, n in stats.experts_per_layer().items()}
    return {layer: sorted(stats.ranking(layer, by)[:n_drop]) for layer in stats.layers}


@torch.no_grad()
def heldout_loss(model: nn.Module, rows: Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats per token) over windows ``rows`` [n, L + 1]: the
    model reads ``rows[:, :-1]`` and predicts ``rows[:, 1:]``."""
    device = input_device(model)
    total, count = 0.0, 0
    for i in range(0, rows.shape[0], batch_size):
        part = rows[i:i + batch_size].to(device)
        logits = model(input_ids=part[:, :-1], use_cache=False).logits
        tgt = part[:, 1:]
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).double(), tgt.reshape(-1), reduction="sum"))
        count += tgt.numel()
    return total / count


def standard_error(values: list[float]) -> float:
    """The standard error of the mean (0 for fewer than two values)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


@dataclass
class PruningEvaluation:
    """Held-out loss per domain: unpruned, and pruned by relevance, frequency and at random
    (every seed), for one fraction."""

    fraction: float
    n_drop: int
    chosen: str
    base: dict[str, float]
    loss: dict[str, dict[str, float]]  # by ("relevance", "frequency") -> domain -> loss
    random: dict[str, list[float]]  # domain -> loss per seed
    plans: dict[str, dict[str, list[int]]]  # by -> plan (random: the first seed's)
    stats: ExpertStats
    info: dict = field(default_factory=dict)  # title, checkpoint, windows, ...

    def to_json(self) -> dict:
        """The numbers (no statistics tensors): what ``report.json`` holds."""
        return {"fraction": self.fraction, "n_drop": self.n_drop, "chosen": self.chosen,
                "base": self.base, "loss": self.loss, "random": self.random,
                "plans": self.plans, "info": self.info}

    @classmethod
    def from_json(cls, data: dict, stats: ExpertStats | None = None) -> PruningEvaluation:
        return cls(data["fraction"], data["n_drop"], data["chosen"], data["base"],
                   data["loss"], data["random"], data["plans"],
                   stats if stats is not None else ExpertStats(), data.get("info", {}))

    def random_mean(self, domain: str) -> float:
        return sum(self.random[domain]) / len(self.random[domain])

    def verdict(self, domain: str) -> str:
        """Whether relevance-based pruning beats each baseline on ``domain``'s held-out loss
        (a smaller increase), worded exactly. Against random pruning's mean, a lower loss
        by two standard errors of that mean or less is not called a win: "does not clearly
        beat"."""
        base, rel = self.base[domain], self.loss["relevance"][domain]
        freq = self.loss["frequency"][domain]
        parts = [f"{'**beats**' if rel < freq else 'does **not** beat'} frequency "
                 f"({freq - base:+.4f})"]
        if self.random.get(domain):
            mean, se = self.random_mean(domain), standard_error(self.random[domain])
            clear = abs(rel - mean) > 2 * se
            if rel >= mean:
                word, note = "does **not** beat", "" if clear else "; higher"
            else:
                word, note = ("**beats**", "") if clear else ("does not clearly beat",
                                                              "; lower")
            parts.append(f"{word} random ({mean - base:+.4f} ± {se:.4f} over "
                         f"{len(self.random[domain])} seeds"
                         + (f"{note} by less than two standard errors" if note else "")
                         + ")")
        return (f"- {domain}, {self.fraction:.0%}: relevance-based pruning "
                f"({rel - base:+.4f}) " + "; ".join(parts) + f", on the {domain} held-out "
                "loss.")

    def rows(self) -> list[tuple[str, dict[str, str]]]:
        """Table rows: (method, domain -> 'loss (Δ)')."""
        out = []
        for by in ("relevance", "frequency"):
            out.append((by + (" (written)" if by == self.chosen else ""),
                        {d: f"{v:.4f} ({v - self.base[d]:+.4f})"
                         for d, v in self.loss[by].items()}))
        if any(self.random.values()):
            n = len(next(iter(self.random.values())))
            out.append((f"random (mean of {n} seeds ± SE)"
                        + (" (written: seed 0)" if self.chosen == "random" else ""),
                        {d: f"{self.random_mean(d):.4f} ({self.random_mean(d) - self.base[d]:+.4f}"
                            f" ± {standard_error(v):.4f})" for d, v in self.random.items()}))
        return out

    def to_markdown(self) -> str:
        domains = list(self.base)
        title = self.info.get("title", "Expert pruning")
        lines = [f"# {title}", ""]
        for key in ("checkpoint", "statistics", "evaluation"):
            if key in self.info:
                lines.append(f"- {key}: {self.info[key]}")
        lines += [f"- pruned: {self.n_drop} experts of every MoE block ({self.fraction:.0%})",
                  "", "| pruned by | " + " | ".join(f"{d} loss (Δ)" for d in domains) + " |",
                  "|---|" + "---|" * len(domains),
                  "| none | " + " | ".join(f"{self.base[d]:.4f}" for d in domains) + " |"]
        for name, cells in self.rows():
            lines.append(f"| {name} | " + " | ".join(cells[d] for d in domains) + " |")
        lines += ["", "## Verdict", ""] + [self.verdict(d) for d in domains]
        lines += ["", "## Pruned experts", "", "| block | by relevance | by frequency |",
                  "|---|---|---|"]
        for layer in self.plans["relevance"]:
            lines.append(f"| `{layer}` | {self.plans['relevance'][layer]} | "
                         f"{self.plans['frequency'][layer]} |")
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        domains = list(self.base)
        title = self.info.get("title", "Expert pruning")
        esc = html.escape
        meta = "".join(f"<div class='meta'>{esc(k)}: {esc(str(self.info[k]))}</div>"
                       for k in ("checkpoint", "statistics", "evaluation") if k in self.info)
        head = "".join(f"<th>{esc(d)} loss (Δ)</th>" for d in domains)
        body = "<tr><td class='name'>none</td>" + "".join(
            f"<td>{self.base[d]:.4f}</td>" for d in domains) + "</tr>"
        for name, cells in self.rows():
            body += f"<tr><td class='name'>{esc(name)}</td>" + "".join(
                f"<td>{esc(cells[d])}</td>" for d in domains) + "</tr>"
        verdicts = "".join(f"<li>{esc(self.verdict(d)[2:]).replace('**', '')}</li>"
                           for d in domains)
        layers = list(self.stats.layers)
        E = max(self.stats.experts_per_layer().values())
        cols = [str(e) for e in range(E)]

        def matrix(values: Mapping[str, Tensor]) -> list[list[float]]:
            return [[float(v) for v in values[layer].tolist()] + [math.nan] * (
                E - values[layer].numel()) for layer in layers]

        share = {k: st.abs_relevance / st.abs_relevance.sum().clamp_min(1e-300)
                 for k, st in self.stats.layers.items()}
        freq = {k: self.stats.frequency(k) for k in layers}
        dropped = {k: torch.tensor([1.0 if e in self.plans[self.chosen][k] else 0.0
                                    for e in range(self.stats.layers[k].relevance.numel())])
                   for k in layers}
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
                f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>{meta}"
                f"<div class='meta'>pruned: {self.n_drop} experts of every MoE block "
                f"({self.fraction:.0%}), written by {esc(self.chosen)}</div>"
                f"<h2>Held-out loss (nats per token)</h2><table><tr><th>pruned by</th>{head}"
                f"</tr>{body}</table><h2>Verdict</h2><ul>{verdicts}</ul>"
                + _heatmap(layers, matrix(share), cols, "Relevance share (layer × expert)",
                           "share of the block's |relevance| each expert carried")
                + _heatmap(layers, matrix(freq), cols, "Routing frequency (layer × expert)",
                           "fraction of tokens routed to each expert")
                + _heatmap(layers, matrix(dropped), cols,
                           f"Pruned experts ({self.chosen})", "dark: removed")
                + "</body></html>")


def evaluate_pruning(model: nn.Module, stats: ExpertStats, fraction: float,
                     heldout: Mapping[str, Tensor], *, top_k: int, chosen: str = "relevance",
                     random_seeds: int = 10, batch_size: int = 8,
                     progress: bool = False) -> PruningEvaluation:
    """Held-out loss per domain (``heldout``: domain -> windows [n, L + 1]) of ``model``
    unpruned and with the ``fraction`` least important experts of every block masked out
    of routing, by relevance, by frequency and at random (``random_seeds`` seeds)."""
    E = min(stats.experts_per_layer().values())
    n_drop = experts_to_drop(E, fraction, top_k)
    plans = {by: pruning_plan(stats, n_drop, by) for by in ("relevance", "frequency")}
    plans["random"] = pruning_plan(stats, n_drop, "random", seed=0)

    def losses(plan: dict[str, list[int]] | None) -> dict[str, float]:
        if plan is None:
            return {d: heldout_loss(model, rows, batch_size) for d, rows in heldout.items()}
        with pruned(model, plan):
            return {d: heldout_loss(model, rows, batch_size) for d, rows in heldout.items()}

    steps = 3 + random_seeds
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            print(f"  evaluated {what} ({done}/{steps})", flush=True)

    base = losses(None)
    tick("unpruned")
    loss = {}
    for by in ("relevance", "frequency"):
        loss[by] = losses(plans[by])
        tick(by)
    rnd: dict[str, list[float]] = {d: [] for d in heldout}
    for seed in range(random_seeds):
        for d, v in losses(pruning_plan(stats, n_drop, "random", seed=seed)).items():
            rnd[d].append(v)
        tick(f"random seed {seed}")
    return PruningEvaluation(fraction, n_drop, chosen, base, loss, rnd, plans, stats)
