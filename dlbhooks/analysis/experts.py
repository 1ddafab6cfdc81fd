"""``ExpertStats``: per MoE layer and expert, over many explanations (a corpus)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..results import read_saved, write_saved


def model_order(blocks: Iterable[str]) -> list[str]:
    """Block names in model order (``layers.2`` before ``layers.10``), as ExpertStats."""
    def key(name: str) -> list:
        return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.#]", name)]

    return sorted(blocks, key=key)


@dataclass
class _Layer:
    relevance: Tensor  # [E] total relevance carried (float64)
    abs_relevance: Tensor  # [E] total |relevance|
    routed: Tensor  # [E] tokens that selected the expert
    weight: Tensor  # [E] sum of routing weights given to the expert
    tokens: int = 0  # tokens seen (padding excluded)
    # shared experts (always active, e.g. Qwen2-MoE): total relevance each carried; they
    # are not routed, so rankings and pruning plans cover the routed experts only
    shared: dict[str, float] = field(default_factory=dict)

    def merge(self, other: _Layer) -> None:
        self.relevance += other.relevance
        self.abs_relevance += other.abs_relevance
        self.routed += other.routed
        self.weight += other.weight
        self.tokens += other.tokens
        for name, value in other.shared.items():
            self.shared[name] = self.shared.get(name, 0.0) + value


@dataclass
class ExpertStats:
    """Accumulates expert relevance and routing statistics.

    ``stats.add(exp, mask=attention_mask)`` after each explanation; ``merge`` another
    (e.g. from another process); ``save`` / ``ExpertStats.load`` (safetensors);
    ``ranking(layer, by="relevance" | "frequency" | "weight")`` least to most important.
    """

    layers: dict[str, _Layer] = field(default_factory=dict)
    explanations: int = 0
    #: what the statistics describe (JSON-able; saved with them): ``domain``, ``model``,
    #: the ``run`` that gathered them and its progress (``dlbhooks experts``)
    info: dict = field(default_factory=dict)

    def add(self, exp, mask: Tensor | None = None) -> ExpertStats:
        if not exp.experts:
            raise ValueError("the explanation holds no expert relevance (not an MoE model?)")
        for layer, rel in exp.experts.items():
            idx, w = exp.routing[layer]
            names = exp.expert_columns(layer)
            E = sum(name.isdigit() for name in names)  # routed columns come first
            keep = torch.ones(rel.shape[:-1], dtype=torch.bool, device=rel.device)
            if mask is not None:
                keep = mask.to(rel.device).bool().reshape(keep.shape)
            r_all = rel.detach().double()[keep]  # [tokens, E + shared]
            r = r_all[:, :E]
            shared = {name: float(r_all[:, E + i].sum()) for i, name in enumerate(names[E:])}
            sel = idx.long()[keep]  # [tokens, k]
            wt = w.detach().double()[keep]
            routed = torch.zeros(E, dtype=torch.float64).index_add_(
                0, sel.reshape(-1).cpu(), torch.ones(sel.numel(), dtype=torch.float64))
            weight = torch.zeros(E, dtype=torch.float64).index_add_(
                0, sel.reshape(-1).cpu(), wt.reshape(-1).cpu())
            new = _Layer(r.sum(0).cpu(), r.abs().sum(0).cpu(), routed, weight, int(keep.sum()),
                         shared)
            if layer in self.layers:
                self.layers[layer].merge(new)
            else:
                self.layers[layer] = new
        self._order()
        self.explanations += 1
        return self

    def _order(self) -> None:
        """Layers in model order (``layers.2`` before ``layers.10``), not reverse-pass order."""
        self.layers = {k: self.layers[k] for k in model_order(self.layers)}

    def merge(self, other: ExpertStats) -> ExpertStats:
        for layer, st in other.layers.items():
            if layer in self.layers:
                self.layers[layer].merge(st)
            else:
                self.layers[layer] = _Layer(st.relevance.clone(), st.abs_relevance.clone(),
                                            st.routed.clone(), st.weight.clone(), st.tokens,
                                            dict(st.shared))
        self._order()
        self.explanations += other.explanations
        return self

    def experts_per_layer(self) -> dict[str, int]:
        """Routed experts of every MoE layer (block path -> count)."""
        return {layer: st.relevance.numel() for layer, st in self.layers.items()}

    def check_layout(self, layout: dict[str, int], what: str = "the model") -> None:
        """Raise a ValueError unless these statistics cover exactly the MoE blocks of
        ``layout`` (block path -> routed experts), with the same expert counts."""
        mine = self.experts_per_layer()
        if mine == layout:
            return
        missing, extra = sorted(set(layout) - set(mine)), sorted(set(mine) - set(layout))
        counts = {k: (mine[k], layout[k]) for k in set(mine) & set(layout)
                  if mine[k] != layout[k]}
        parts = []
        if missing:
            parts.append(f"no statistics for {what}'s blocks {missing[:4]}"
                         + (" ..." if len(missing) > 4 else ""))
        if extra:
            parts.append(f"statistics for blocks {what} lacks: {extra[:4]}"
                         + (" ..." if len(extra) > 4 else ""))
        if counts:
            k, (a, b) = next(iter(sorted(counts.items())))
            parts.append(f"{k} has {a} experts in the statistics and {b} in {what}"
                         + (f" (and {len(counts) - 1} more blocks differ)" if len(counts) > 1
                            else ""))
        model = self.info.get("model")
        raise ValueError("the expert statistics" + (f" (gathered on {model})" if model else "")
                         + f" do not match {what}: " + "; ".join(parts))

    # -- views --------------------------------------------------------------------------
    def frequency(self, layer: str) -> Tensor:
        """Fraction of tokens that selected each expert."""
        st = self.layers[layer]
        return st.routed / max(st.tokens, 1)

    def mean_weight(self, layer: str) -> Tensor:
        """Mean routing weight of each expert when selected."""
        st = self.layers[layer]
        return st.weight / st.routed.clamp_min(1)

    def score(self, layer: str, by: str = "relevance") -> Tensor:
        st = self.layers[layer]
        if by == "relevance":
            return st.abs_relevance
        if by == "signed":
            return st.relevance
        if by == "frequency":
            return st.routed
        if by == "weight":
            return st.weight
        raise ValueError(f"unknown ranking {by!r}: relevance, signed, frequency or weight")

    def ranking(self, layer: str, by: str = "relevance") -> list[int]:
        """Experts of ``layer`` from least to most important."""
        return torch.argsort(self.score(layer, by), stable=True).tolist()

    def least(self, fraction: float, by: str = "relevance") -> dict[str, list[int]]:
        """The ``fraction`` least important experts of every layer."""
        out = {}
        for layer, st in self.layers.items():
            n = int(round(fraction * st.relevance.numel()))
            out[layer] = sorted(self.ranking(layer, by)[:n])
        return out

    def __str__(self) -> str:
        lines = [f"ExpertStats over {self.explanations} explanations"]
        for layer, st in self.layers.items():
            rel = st.abs_relevance / st.abs_relevance.sum().clamp_min(1e-300)
            cells = " ".join(f"{v:5.1%}" for v in rel.tolist())
            lines.append(f"  {layer}: relevance share {cells}")
        return "\n".join(lines)

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Totals to a safetensors file; counts and layer data as its JSON metadata."""
        tensors: dict = {}
        meta: dict = {"explanations": self.explanations, "tokens": {}, "shared": {},
                      "info": self.info}
        for layer, st in self.layers.items():
            for name in ("relevance", "abs_relevance", "routed", "weight"):
                tensors[f"{name}/{layer}"] = getattr(st, name)
            meta["tokens"][layer] = st.tokens
            meta["shared"][layer] = st.shared
        write_saved(path, "dlbhooks_expert_stats", meta, tensors)

    @classmethod
    def load(cls, path: str | Path) -> ExpertStats:
        meta, t = read_saved(path, "dlbhooks_expert_stats")
        stats = cls(explanations=meta["explanations"], info=dict(meta.get("info", {})))
        for layer, tokens in meta["tokens"].items():
            stats.layers[layer] = _Layer(
                t[f"relevance/{layer}"], t[f"abs_relevance/{layer}"], t[f"routed/{layer}"],
                t[f"weight/{layer}"], tokens=tokens,
                shared=dict(meta.get("shared", {}).get(layer, {})))
        return stats
