"""Explanation: relevance per input, per layer and at any module; save / load."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import SavedFileError, TraceError
from .ledger import LedgerEntry
from .plot import plot_explanation
from .report import explanation_html


class InputRelevance(dict):
    """``{argument name: relevance}``; an unknown name is a ``KeyError`` that lists the
    names there are (an ``nn.Sequential``'s input is ``"input"``, a transformers model's
    ``"input_ids"``, ...)."""

    def __missing__(self, key):
        raise KeyError(f"{key!r} is not an explained input; the inputs are {list(self)} (keyed "
                       "by the forward's argument names)")


@dataclass
class Explanation:
    """The result of one explanation.

    ``inputs``: relevance shaped like each forward input, keyed by argument name (``pos -
    neg`` in contrastive mode, whose streams are ``positive`` and ``negative``).
    ``layers``: total relevance at each module's input, output→input order. ``absorbed``:
    what each module's rule absorbed (bias shares, guards; ``pos - neg`` in contrastive
    mode, whose per-stream values are ``absorbed_positive`` / ``absorbed_negative``).
    ``ledger``: the full accounting.
    """

    inputs: dict[str, Tensor]
    layers: dict[str, float]
    absorbed: dict[str, float]
    mode: str = "default"
    multiplier: float = 100.0
    positive: dict[str, Tensor] | None = None
    negative: dict[str, Tensor] | None = None
    target: Any = None
    ledger: list[LedgerEntry] = field(default_factory=list)
    tensors: dict[str, list[Tensor | None]] = field(default_factory=dict)
    scaler: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: relevance through each attention head: {attention module path: [batch, heads]}
    heads: dict[str, Tensor] = field(default_factory=dict)
    #: per residual block: {layer path: {"attention": ., "mlp": ., "residual": .}} totals.
    #: Each residual add splits its own output between its branch and its skip, so these
    #: are shares at two adds (a pre-norm layer: "mlp" and one "residual" part at the
    #: layer's output, "attention" and the other at the attention sublayer's output, which
    #: also carries what came back through the MLP), not a partition of the layer's total
    blocks: dict[str, dict[str, float]] = field(default_factory=dict)
    #: MoE: relevance each expert carried, {moe block path: [batch, tokens, experts]}; shared
    #: experts are extra last columns (names: :meth:`expert_columns`)
    experts: dict[str, Tensor] = field(default_factory=dict)
    #: MoE: {moe block path: (selected experts [batch, tokens, k], weights [batch, tokens, k])}
    routing: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)
    #: contrastive mode: what each module's rule absorbed from each stream (``absorbed`` is
    #: their difference); per stream, inputs + absorbed = multiplier × batch rows
    absorbed_positive: dict[str, float] | None = None
    absorbed_negative: dict[str, float] | None = None

    def __post_init__(self) -> None:
        self.inputs = InputRelevance(self.inputs)
        if self.positive is not None:
            self.positive = InputRelevance(self.positive)
        if self.negative is not None:
            self.negative = InputRelevance(self.negative)

    def __repr__(self) -> str:
        """A short summary (the tensors are in the fields): target, inputs, totals, where the
        rest was absorbed, the conservation check."""
        rows = len(next(iter(self.inputs.values()))) if self.inputs else 0
        lines = [f"Explanation(mode={self.mode!r}, target={_short(self.target)}, "
                 f"multiplier={self.multiplier:g}, {rows} row(s))"]
        for name, t in self.inputs.items():
            line = f"  input {name!r} {list(t.shape)}: total {float(t.double().sum()):.6g}"
            if self.positive is not None and self.negative is not None:
                line += (f" (+ stream {float(self.positive[name].double().sum()):.6g}, "
                         f"- stream {float(self.negative[name].double().sum()):.6g})")
            lines.append(line)
        by_type: dict[str, float] = {}
        types = {e.key: e.type for e in self.ledger}
        for key, value in self.absorbed.items():
            kind = types.get(key, "?")
            by_type[kind] = by_type.get(kind, 0.0) + value
        shown = sorted(by_type.items(), key=lambda kv: -abs(kv[1]))[:6]
        cells = ", ".join(f"{k} {v:.4g}" for k, v in shown if v)
        lines.append(f"  absorbed {self.total_absorbed:.6g}" + (f" ({cells})" if cells else ""))
        if self.ledger:
            lines.append(f"  conservation error {self.conservation_error():.2g} of the seed")
        return "\n".join(lines)

    def to_html(self, tokens: Any = None, *, row: int = 0, title: str | None = None,
                image: Any = None) -> str:
        """A self-contained HTML report (no network): inputs coloured by signed relevance
        (``tokens``: the token strings of a text input), both streams in contrastive mode,
        the ledger, relevance per layer, head and expert. Write it to a file and open it,
        or let a notebook show it (``_repr_html_``). ``image``: the input image, drawn
        under the relevance heatmap the report embeds (with matplotlib)."""
        return explanation_html(self, tokens, row=row, title=title, image=image)

    def _repr_html_(self) -> str:
        return explanation_html(self)

    def plot(self, input: str | None = None, *, row: int = 0,  # noqa: A002
             tokens: list[str] | None = None, ax: Any = None, image: Any = None) -> Any:
        """A matplotlib figure of an input's relevance (``pip install 'dlbhooks[plot]'``):
        a signed heatmap over an image (summed over channels, centred at 0), bars for
        tabular features or tokens; ``image`` (the input) is drawn under the heatmap.
        Returns the axes."""
        return plot_explanation(self, input, row=row, tokens=tokens, ax=ax, image=image)

    def at(self, path: str, input: int = 0) -> Tensor:  # noqa: A002 - mirrors record inputs
        """Relevance at one module's input (neuron level); ``path#k`` for its k-th call."""
        if path not in self.tensors:
            known = ", ".join(list(self.tensors)[:12])
            raise KeyError(
                f"no relevance kept for module {path!r} (it got none, or keep=False). "
                f"Known: {known}{', ...' if len(self.tensors) > 12 else ''}"
            )
        t = self.tensors[path][input]
        if t is None:
            raise KeyError(f"input {input} of {path!r} received no relevance")
        if self.scaler is not None:
            total = t.sum()
            t = t * (self.scaler / total) if total != 0 else t
        return t

    def expert_columns(self, block: str) -> list[str]:
        """Names of the columns of ``experts[block]``: the routed experts' ids (``"0"``,
        ``"1"``, ...), then the block's shared experts, if any (e.g. ``"shared"``; a
        block with shared experts reports them next to ``"routed"`` in ``blocks[block]``)."""
        shares = self.blocks.get(block, {})
        extra = [name for name in shares if name != "routed"] if "routed" in shares else []
        n = self.experts[block].shape[-1] - len(extra)
        return [str(i) for i in range(n)] + extra

    @property
    def total_input(self) -> float:
        """Sum of the input relevance over all inputs (``pos - neg`` in contrastive mode)."""
        return float(sum(float(t.double().sum()) for t in self.inputs.values()))

    @property
    def total_absorbed(self) -> float:
        return float(sum(self.absorbed.values()))

    def conservation_error(self) -> float:
        """The largest ``|relevance_out - relevance_in - absorbed_inside|`` over the
        ledger's calls (per stream in contrastive mode), relative to the seeded relevance:
        0 up to rounding when every unit of relevance is accounted for (an audit check)."""
        if not self.ledger:
            raise TraceError("this explanation has no ledger (nothing was processed)")

        def pairs(x):
            return x if isinstance(x, tuple) else (x,)

        seeded = max(max(abs(v) for v in pairs(self.ledger[0].relevance_out)), 1e-300)
        return max(abs(o - i - a) for e in self.ledger
                   for o, i, a in zip(pairs(e.relevance_out), pairs(e.relevance_in),
                                      pairs(e.absorbed_inside))) / seeded

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write tensors to a safetensors file, everything else as its JSON metadata (a
        tensor that appears under several names, as one module's input often is another's,
        is written once)."""
        tensors: dict[str, Tensor] = {}
        for group, d in (("inputs", self.inputs), ("positive", self.positive or {}),
                         ("negative", self.negative or {}), ("heads", self.heads),
                         ("experts", self.experts)):
            for k, v in d.items():
                tensors[f"{group}/{k}"] = v
        for k, (i, w) in self.routing.items():
            tensors[f"routing_idx/{k}"] = i
            tensors[f"routing_w/{k}"] = w
        for k, vs in self.tensors.items():
            for i, v in enumerate(vs):
                if v is not None:
                    tensors[f"at/{i}/{k}"] = v
        meta = {
            "layers": self.layers, "absorbed": self.absorbed, "mode": self.mode,
            "multiplier": self.multiplier, "scaler": self.scaler,
            "target": _jsonable(self.target), "info": _jsonable(self.info),
            "contrastive": self.positive is not None,
            "ledger": [asdict(e) for e in self.ledger],
            "at_arity": {k: len(v) for k, v in self.tensors.items()},
            "blocks": self.blocks,
            "absorbed_positive": self.absorbed_positive,
            "absorbed_negative": self.absorbed_negative,
            # the file's tensors come back sorted by name: keep each dict's own order
            "order": {"inputs": list(self.inputs), "heads": list(self.heads),
                      "experts": list(self.experts), "routing": list(self.routing)},
        }
        write_saved(path, "dlbhooks", meta, tensors)

    @classmethod
    def load(cls, path: str | Path) -> Explanation:
        meta, saved = read_saved(path, "dlbhooks")
        groups: dict[str, dict[str, Tensor]] = {
            "inputs": {}, "positive": {}, "negative": {}, "heads": {}, "experts": {},
            "routing_idx": {}, "routing_w": {}}
        tensors: dict[str, list[Tensor | None]] = {
            k: [None] * n for k, n in meta["at_arity"].items()
        }
        for key, value in saved.items():
            group, rest = key.split("/", 1)
            if group == "at":
                i, name = rest.split("/", 1)
                tensors[name][int(i)] = value
            else:
                groups[group][rest] = value
        for group, keys in meta.get("order", {}).items():
            for g in ("routing_idx", "routing_w") if group == "routing" else (group,):
                groups[g] = {k: groups[g][k] for k in keys}
        for g in ("positive", "negative"):
            groups[g] = {k: groups[g][k] for k in groups["inputs"] if k in groups[g]}
        contrastive = meta["contrastive"]
        # JSON has no tuples: a contrastive entry's (pos, neg) pairs come back as lists
        ledger = [LedgerEntry(**{k: tuple(v) if isinstance(v, list) else v
                                 for k, v in e.items()}) for e in meta["ledger"]]
        return cls(
            inputs=groups["inputs"], layers=meta["layers"], absorbed=meta["absorbed"],
            mode=meta["mode"], multiplier=meta["multiplier"],
            positive=groups["positive"] if contrastive else None,
            negative=groups["negative"] if contrastive else None,
            target=meta["target"], ledger=ledger,
            tensors=tensors, scaler=meta["scaler"], info=meta["info"],
            heads=groups["heads"], blocks=meta.get("blocks", {}), experts=groups["experts"],
            routing={k: (v, groups["routing_w"][k]) for k, v in groups["routing_idx"].items()},
            absorbed_positive=meta.get("absorbed_positive"),
            absorbed_negative=meta.get("absorbed_negative"),
        )


_KINDS = {"dlbhooks": ("explanation", "dlb.Explanation.load"),
          "dlbhooks_generation": ("generation explanation", "dlb.GenerationExplanation.load"),
          "dlbhooks_expert_stats": ("expert statistics", "dlb.ExpertStats.load")}


def write_saved(path: str | Path, key: str, meta: dict, tensors: dict[str, Tensor]) -> None:
    """A safetensors file of ``tensors`` (on the CPU) with ``meta`` as JSON under ``key``.
    safetensors refuses tensors that share memory: one written under an earlier name
    (same storage and view) is written once and recorded as an alias, and any other view
    of a storage already written is copied."""
    from safetensors.torch import save_file

    out: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        view = (str(t.device), ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and view in views:
            aliases[name] = views[view]
            continue
        views[view] = name
        if t.device.type != "cpu":
            t = t.cpu()  # a copy of its own
        elif t.numel() and ptr in storages:
            t = t.clone(memory_format=torch.contiguous_format)
        t = t.contiguous()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    save_file(out, str(path), metadata={key: json.dumps({**meta, "aliases": aliases})})


def read_saved(path: str | Path, key: str) -> tuple[dict, dict[str, Tensor]]:
    """The JSON metadata under ``key`` and every tensor of a file written by a dlbhooks
    ``save``; :class:`SavedFileError` for any other file (naming the right loader if the
    file holds another kind of dlbhooks result)."""
    from safetensors import SafetensorError, safe_open

    what = _KINDS[key][0]
    try:
        handle = safe_open(str(path), framework="pt")
    except SafetensorError as err:
        raise SavedFileError(f"{path} is not a saved dlbhooks {what}: {err}") from err
    with handle as f:
        meta = f.metadata() or {}
        if key not in meta:
            other = next((k for k in _KINDS if k in meta), None)
            hint = (f"; it holds a dlbhooks {_KINDS[other][0]}: load it with "
                    f"{_KINDS[other][1]}" if other else " (no dlbhooks metadata)")
            raise SavedFileError(f"{path} is not a saved dlbhooks {what}{hint}")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(meta[key])
    for name, first in meta.pop("aliases", {}).items():
        tensors[name] = tensors[first]
    return meta, tensors


def _short(x: Any, n: int = 8) -> str:
    """``repr`` of a target, cut after ``n`` items."""
    if isinstance(x, list) and len(x) > n:
        return repr(x[:n])[:-1] + f", ... ({len(x)} in all)]"
    return repr(x)


def _jsonable(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (int, float, str, bool)) or x is None:
        return x
    return repr(x)

