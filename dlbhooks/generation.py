"""Explain a generated continuation, token by token: ``dlb.explain_generation``.

A decoder-only language model generates ``n`` tokens after a prompt of ``T`` tokens. The
token generated at sequence position ``T + k`` is predicted by the logits at position
``T + k - 1``, and by causality those logits depend only on positions ``0 .. T + k - 1``.
So one recorded forward over ``prompt + generated[:-1]`` holds everything needed, and the
generated tokens are explained as several targets of that one tape
(``tape.explain(targets=...)``, each at its own position ``T + k - 1``): up to
``targets_per_pass`` of them in one reverse pass, which shares every product that depends
on the forward only (the denominators, the attention probabilities). Row ``k`` of the
result's ``matrix`` is the relevance of every earlier token for generated token ``k``; the
entries after position ``T + k - 1`` are exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .api import takes_logits_to_keep
from .explaining import explain_targets
from .integrations.accelerate import input_device
from .report import generation_html
from .results import Explanation, read_saved, write_saved
from .trace import trace


@dataclass
class GenerationExplanation:
    """Relevance of the context for each generated token.

    ``ids``: the full sequence ``[T + n]`` (prompt then generated). ``generated``: the ``n``
    generated ids. ``matrix``: ``[n, T + n - 1]``, row ``k`` = relevance of each position
    for generated token ``k`` (``pos - neg`` in contrastive mode; the streams are
    ``positive`` / ``negative``); columns after ``T + k - 1`` are 0. ``absorbed``: ``[n]``,
    what each explanation's rules absorbed (bias shares, guards), so that
    ``matrix[k].sum() + absorbed[k] == multiplier`` in default mode; in contrastive mode it
    is ``absorbed_positive - absorbed_negative``, and per stream ``positive[k].sum() +
    absorbed_positive[k] == multiplier`` (likewise for the negative stream; a norm's β
    absorbs, weighted sums do not). ``tokens``: the decoded tokens of
    ``ids`` when a tokenizer was given. ``explanations``: the full per-token
    :class:`~dlbhooks.Explanation` objects (only with ``keep=True``).
    """

    ids: Tensor
    generated: Tensor
    matrix: Tensor
    absorbed: Tensor
    prompt_length: int
    mode: str = "default"
    multiplier: float = 100.0
    tokens: list[str] | None = None
    positive: Tensor | None = None
    negative: Tensor | None = None
    explanations: list[Explanation] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    absorbed_positive: Tensor | None = None
    absorbed_negative: Tensor | None = None

    @property
    def n(self) -> int:
        """Number of generated (explained) tokens."""
        return int(self.generated.numel())

    def to_html(self, title: str | None = None) -> str:
        """A self-contained HTML report: the generated × context matrix, each generated
        token's map (both streams in contrastive mode)."""
        return generation_html(self, title=title)

    def _repr_html_(self) -> str:
        return generation_html(self)

    def row(self, k: int) -> Tensor:
        """Relevance of positions ``0 .. T + k - 1`` (the only non-zero ones) for token k."""
        return self.matrix[k, : self.prompt_length + k]

    def conservation_error(self) -> float:
        """The largest ``|row total + absorbed - multiplier|`` over the generated tokens
        (per stream in contrastive mode), relative to ``multiplier``: 0 up to rounding
        when every unit of each token's relevance is accounted for (an audit check)."""
        if self.positive is None:
            pairs = [(self.matrix, self.absorbed)]
        else:
            pairs = [(self.positive, self.absorbed_positive),
                     (self.negative, self.absorbed_negative)]
        done = ~torch.isnan(self.absorbed)  # (tokens left unexplained: rows of NaN)
        errors = [(m.double()[done].sum(-1) + a[done] - self.multiplier).abs().max()
                  for m, a in pairs if bool(done.any())]
        return float(max(errors, default=0.0)) / abs(self.multiplier)

    # -- display --------------------------------------------------------------------------
    def _label(self, pos: int, width: int = 10) -> str:
        if self.tokens is not None:
            s = self.tokens[pos].replace("\n", "\\n")
        else:
            s = str(int(self.ids[pos]))
        return s if len(s) <= width else s[: width - 1] + "~"

    def to_text(self, top: int = 5, full: bool | None = None) -> str:
        """A compact table: per generated token, its ``top`` most relevant earlier tokens
        (by |relevance|). With ``full=True`` (default when at most 12 columns) the whole
        matrix is printed instead."""
        T, n = self.prompt_length, self.n
        cols = self.matrix.shape[1]
        if full is None:
            full = cols <= 12
        head = (f"{n} generated token(s) after a {T}-token prompt; mode={self.mode}, "
                f"multiplier={self.multiplier:g}")
        lines = [head]
        if full:
            labels = [self._label(j, 8) for j in range(cols)]
            w = max(8, *(len(s) for s in labels))
            lines.append(f"{'k':>3} {'token':<10}|" + "".join(f"{s:>{w + 1}}" for s in labels)
                         + f" |{'absorbed':>10}")
            for k in range(n):
                vals = "".join(
                    f"{float(self.matrix[k, j]):>{w + 1}.3g}" if j < T + k else f"{'.':>{w + 1}}"
                    for j in range(cols))
                lines.append(f"{k:>3} {self._label(T + k):<10}|{vals} |"
                             f"{float(self.absorbed[k]):>10.3g}")
            return "\n".join(lines)
        lines.append(f"{'k':>3} {'token':<10}| top {top} context tokens (position: relevance)"
                     f"{'':>4}| absorbed")
        for k in range(n):
            r = self.row(k)
            idx = r.abs().argsort(descending=True)[:top].tolist()
            cells = "  ".join(f"{self._label(j)}@{j}: {float(r[j]):.3g}" for j in idx)
            lines.append(f"{k:>3} {self._label(T + k):<10}| {cells} | "
                         f"{float(self.absorbed[k]):.3g}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    # -- persistence ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain Python data (lists and numbers), e.g. for JSON."""
        d: dict[str, Any] = {
            "ids": self.ids.tolist(), "generated": self.generated.tolist(),
            "matrix": self.matrix.tolist(), "absorbed": self.absorbed.tolist(),
            "prompt_length": self.prompt_length, "mode": self.mode,
            "multiplier": self.multiplier, "tokens": self.tokens,
        }
        if self.positive is not None:
            d["positive"], d["negative"] = self.positive.tolist(), self.negative.tolist()
        return d

    def save(self, path: str | Path) -> None:
        """Tensors to a safetensors file; tokens, mode and sizes as its JSON metadata
        (the per-token explanations are not saved: save them one by one if needed)."""
        tensors = {"ids": self.ids, "generated": self.generated, "matrix": self.matrix,
                   "absorbed": self.absorbed}
        if self.positive is not None:
            tensors.update(positive=self.positive, negative=self.negative,
                           absorbed_positive=self.absorbed_positive,
                           absorbed_negative=self.absorbed_negative)
        meta = {"prompt_length": self.prompt_length, "mode": self.mode,
                "multiplier": self.multiplier, "tokens": self.tokens, "info": self.info}
        write_saved(path, "dlbhooks_generation", meta, tensors)

    @classmethod
    def load(cls, path: str | Path) -> GenerationExplanation:
        meta, t = read_saved(path, "dlbhooks_generation")
        return cls(ids=t["ids"], generated=t["generated"], matrix=t["matrix"],
                   absorbed=t["absorbed"], prompt_length=meta["prompt_length"],
                   mode=meta["mode"], multiplier=meta["multiplier"], tokens=meta["tokens"],
                   positive=t.get("positive"), negative=t.get("negative"),
                   info=meta.get("info", {}), absorbed_positive=t.get("absorbed_positive"),
                   absorbed_negative=t.get("absorbed_negative"))


def _prompt_ids(tokenizer_or_ids: Any, prompt: str | None, attention_mask: Tensor | None):
    """(ids [1, T], attention mask [1, T] or None, tokenizer or None)."""
    if isinstance(tokenizer_or_ids, Tensor):
        if prompt is not None:
            raise TypeError("pass either prompt ids, or a tokenizer and prompt=..., not both")
        ids = tokenizer_or_ids
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.is_floating_point():
            raise TypeError(f"prompt ids must be a LongTensor [1, T], got {ids.dtype} "
                            f"{tuple(tokenizer_or_ids.shape)}")
        tok = None
    else:
        if prompt is None or not isinstance(prompt, str):
            raise TypeError("with a tokenizer, pass the prompt text: prompt='...'")
        tok = tokenizer_or_ids
        enc = tok(prompt, return_tensors="pt")
        ids = enc["input_ids"]
        if attention_mask is None:
            attention_mask = enc.get("attention_mask")
    if ids.shape[0] != 1:
        raise ValueError(f"explain_generation explains one sequence (batch 1); got batch "
                         f"{ids.shape[0]}. Call it once per prompt.")
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    if attention_mask is not None:
        attention_mask = attention_mask.reshape(1, -1)
        if attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match the "
                             f"prompt {tuple(ids.shape)}")
    return ids.long(), attention_mask, tok


def explain_generation(  # long: its docstring documents every option of a public entry point
    model: nn.Module,
    tokenizer_or_ids: Any,
    prompt: str | None = None,
    *,
    max_new_tokens: int = 8,
    mode: str = "default",
    multiplier: float = 100.0,
    saturation: bool = True,
    attention_mask: Tensor | None = None,
    generated_ids: Tensor | None = None,
    keep: bool = False,
    storage: Any = None,
    share: bool = True,
    progress: bool = False,
    only: list[int] | None = None,
    targets_per_pass: int = 8,
    **generate_kwargs: Any,
) -> GenerationExplanation:
    """Generate up to ``max_new_tokens`` tokens after a prompt and explain each of them.

    ``tokenizer_or_ids``: a tokenizer (then ``prompt`` is the text) or a LongTensor of
    prompt ids ``[1, T]`` (or ``[T]``). One sequence only (batch 1): call once per prompt.
    The model is a decoder-only causal LM returning ``logits`` [batch, positions, vocab].

    Generation is ``model.generate(ids, do_sample=False, max_new_tokens=...)`` (greedy),
    run outside any trace; ``generate_kwargs`` are passed on: sampling (``do_sample=True,
    top_k=50, top_p=0.9, temperature=0.8``), beam search (``num_beams=4``: the best beam is
    explained), ``eos_token_id``, ``repetition_penalty``, ... Each generated token is
    explained at its own logit, whichever strategy chose it. It may stop early at an
    end-of-sequence token. Pass ``generated_ids`` (``[n]`` or ``[1, n]``) to explain a
    given continuation instead.

    Then one traced forward over ``prompt + generated[:-1]`` and one reverse pass per
    ``targets_per_pass`` generated tokens (each pass explains that many tokens at once;
    memory for relevance grows with it). ``keep=True`` also
    returns each token's full :class:`~dlbhooks.Explanation` (with per-module tensors).
    ``storage`` is the record storage policy of :func:`dlbhooks.trace` (e.g. ``"cpu"``).
    ``progress``: a bar over the tokens' explanations; ``only``: these generated tokens
    (indices) only, the other rows NaN. ``share``: when there is more than one reverse
    pass, they share the denominators (``tape.explain(share=True)``; one more copy of the
    activations).
    """
    if not (isinstance(targets_per_pass, int) and targets_per_pass >= 1):
        raise ValueError(f"targets_per_pass must be a positive int, got {targets_per_pass!r}")
    ids, mask, tok = _prompt_ids(tokenizer_or_ids, prompt, attention_mask)
    device = input_device(model)
    ids = ids.to(device)
    mask = None if mask is None else mask.to(device)
    gen = _continuation(model, ids, mask, tok, max_new_tokens, generated_ids, generate_kwargs)
    n = int(gen.numel())
    seq = torch.cat([ids[0], gen])
    T = ids.shape[1]
    fwd = _forward_inputs(seq, mask, n)
    if takes_logits_to_keep(model):  # the logits of the explained positions only
        fwd["logits_to_keep"] = n
    with trace(model, storage=storage) as tape:
        model(**fwd)
    rows = _TokenRows(keep=keep)
    chosen = [k for k in range(n) if only is None or k in only]
    passes = [chosen[i:i + targets_per_pass] for i in range(0, len(chosen), targets_per_pass)]
    options = {"mode": mode, "multiplier": multiplier, "saturation": saturation, "keep": keep,
               "share": share and len(passes) > 1}
    done: dict[int, Explanation] = {}
    for group in _steps(passes, progress):
        specs = [(int(gen[k]), T + k - 1) for k in group]
        # the last pass frees the records behind its walk, unless it reads shared ones
        last = group is passes[-1] and not options["share"]
        done.update(zip(group, explain_targets(tape, specs, release=last, **options)))
    for k in range(n):
        if k in done:
            rows.add(done.pop(k))
        else:
            rows.skip(seq.shape[-1] - 1, mode == "contrastive")
    del tape
    tokens = None if tok is None else [tok.decode([int(i)]) for i in seq.tolist()]
    return rows.result(
        ids=seq.cpu(), generated=gen.cpu(), prompt_length=T, mode=mode,
        multiplier=float(multiplier), tokens=tokens,
        info={"saturation": saturation, "generated_here": generated_ids is None},
    )


def _steps(passes: list[list[int]], progress: bool) -> Any:
    """The reverse passes (groups of generated tokens), with a progress bar if asked."""
    if not progress:
        return passes
    from tqdm.auto import tqdm  # lazy: only for the bar (tqdm comes with transformers)

    return tqdm(passes, desc="explaining generated tokens", unit="pass")


def _continuation(model: nn.Module, ids: Tensor, mask: Tensor | None, tok: Any,
                  max_new_tokens: int, generated_ids: Tensor | None,
                  generate_kwargs: dict[str, Any]) -> Tensor:
    """The generated ids to explain, ``[n]`` with ``n >= 1``: ``generated_ids`` if given,
    else what the model generates after ``ids``."""
    if generated_ids is None:
        gen = _generate(model, ids, mask, tok, max_new_tokens, generate_kwargs)
    else:
        if generate_kwargs:
            raise TypeError(f"generate kwargs {sorted(generate_kwargs)} given with "
                            "generated_ids: nothing is generated")
        gen = torch.as_tensor(generated_ids).to(ids.device).long().reshape(-1)
    if gen.numel() == 0:
        raise ValueError("nothing was generated (the model stopped at once): nothing to explain")
    return gen


def _generate(model: nn.Module, ids: Tensor, mask: Tensor | None, tok: Any,
              max_new_tokens: int, generate_kwargs: dict[str, Any]) -> Tensor:
    """The ids ``model.generate`` appends to the prompt ``ids`` [1, T] (greedy unless
    ``generate_kwargs`` say otherwise), outside any trace: ``[n]``."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, **generate_kwargs}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if "pad_token_id" not in kwargs and tok is not None:
        pad = getattr(tok, "pad_token_id", None)
        kwargs["pad_token_id"] = pad if pad is not None else getattr(tok, "eos_token_id", None)
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    out = out.sequences if hasattr(out, "sequences") else out
    return out[0, ids.shape[1]:]


def _forward_inputs(seq: Tensor, mask: Tensor | None, n: int) -> dict[str, Tensor]:
    """Keyword inputs of the one traced forward: ``prompt + generated[:-1]`` (``seq``
    without its last id), the prompt's mask extended over the ``n - 1`` generated ids."""
    fwd: dict[str, Tensor] = {"input_ids": seq[:-1].unsqueeze(0)}
    if mask is not None:
        fwd["attention_mask"] = torch.cat([mask, mask.new_ones(1, n - 1)], dim=1)
    return fwd


@dataclass
class _TokenRows:
    """The per-token explanations, gathered into the rows of a
    :class:`GenerationExplanation`."""

    keep: bool  # keep the whole explanations
    rows: list[Tensor] = field(default_factory=list)
    pos_rows: list[Tensor] = field(default_factory=list)
    neg_rows: list[Tensor] = field(default_factory=list)
    absorbed: list[float] = field(default_factory=list)
    streams: list[tuple[float, float]] = field(default_factory=list)  # absorbed per stream
    kept: list[Explanation] = field(default_factory=list)

    def skip(self, width: int, contrastive: bool) -> None:
        """A generated token left unexplained: a row of NaN."""
        nan = torch.full((width,), float("nan"), dtype=torch.float64)
        self.rows.append(nan)
        if contrastive:
            self.pos_rows.append(nan)
            self.neg_rows.append(nan)
            self.streams.append((float("nan"), float("nan")))
        self.absorbed.append(float("nan"))
        if self.keep:
            self.kept.append(None)  # type: ignore[arg-type]

    def add(self, exp: Explanation) -> None:
        """Add the explanation of the next generated token."""
        self.rows.append(exp.inputs["input_ids"][0])
        if exp.positive is not None:
            self.pos_rows.append(exp.positive["input_ids"][0])
            self.neg_rows.append(exp.negative["input_ids"][0])
            self.streams.append((sum(exp.absorbed_positive.values()),
                                 sum(exp.absorbed_negative.values())))
        self.absorbed.append(exp.total_absorbed)
        if self.keep:
            self.kept.append(exp)

    def result(self, **fields: Any) -> GenerationExplanation:
        """The :class:`GenerationExplanation` of these rows and the other ``fields``."""
        def f64(values: list[float]) -> Tensor | None:  # None outside contrastive mode
            return torch.tensor(values, dtype=torch.float64) if self.streams else None

        explained = [r for r, a in zip(self.rows, self.absorbed) if a == a]  # (NaN: skipped)
        dtype = explained[0].dtype if explained else torch.float64

        def stack(rows: list[Tensor]) -> Tensor:
            return torch.stack([r.cpu().to(dtype) for r in rows])

        return GenerationExplanation(
            matrix=stack(self.rows),
            absorbed=torch.tensor(self.absorbed, dtype=torch.float64),
            positive=stack(self.pos_rows) if self.pos_rows else None,
            negative=stack(self.neg_rows) if self.neg_rows else None,
            explanations=self.kept if self.keep else None,
            absorbed_positive=f64([a for a, _ in self.streams]),
            absorbed_negative=f64([b for _, b in self.streams]),
            **fields,
        )
