"""Where relevance starts: targets and tasks (METHOD.md §1).

Every batch row gets ``multiplier`` in total (per stream in contrastive mode).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .errors import NonFiniteError, TargetError
from .relevance import Rel, Streams, all_finite, stack

#: a seed before stacking: one tensor, or a (pos, neg) pair in contrastive mode
_Pair = Tensor | Streams


class Placed(NamedTuple):
    """A seed already stacked (``[S, batch, positions, vocab]``) that is zero outside the
    entries ``[:, rows, positions]`` (its ``support``): an LM's seed at chosen positions."""

    relevance: Tensor
    support: tuple[Tensor, Tensor]


#: numpy dtypes with torch's element layout, for :func:`lazy_zeros`
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
          torch.bfloat16: np.uint16}


def lazy_zeros(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Zeros whose memory is only taken where it is written or read: on the CPU from
    ``calloc`` (through numpy), whose fresh pages the system maps when touched — an LM's
    seed is shaped like its logits (``T × vocab``, 250 MiB at 2,048 tokens of a 32k
    vocabulary) and zero but for a few rows; elsewhere ``torch.zeros``."""
    if torch.device(device).type != "cpu" or dtype not in _NUMPY:
        return torch.zeros(tuple(shape), dtype=dtype, device=device)
    flat = torch.from_numpy(np.zeros(int(np.prod(shape, dtype=np.int64)), _NUMPY[dtype]))
    return flat.view(dtype).view(tuple(shape))

TASKS = {
    "multiclass": "multiclass", "multi-class": "multiclass", "classification": "multiclass",
    "multi-class classification": "multiclass", "binary": "binary",
    "binary-classification": "binary", "binary classification": "binary",
    "regression": "regression", "detection": "detection", "segmentation": "segmentation",
}


def make_seed(
    output: Tensor,
    target: Any = None,
    *,
    task: str = "multiclass",
    multiplier: float = 100.0,
    mode: str = "default",
    thresholding: float = 0.5,
    position: Any = None,
    attention_mask: Tensor | None = None,
    temperature: float = 1.0,
    with_support: bool = False,
) -> Rel | tuple[Rel, tuple[Tensor, Tensor] | None]:
    """Relevance on ``output`` for ``target`` (see README, 'Targets and tasks'), stacked
    (``[1, *shape]``; ``[2, *shape]`` in contrastive mode: positive, negative).
    ``attention_mask`` ([batch, positions], the model's own) places the default position
    of sequence outputs at each row's last real token and rejects positions on padding.
    ``with_support``: also return ``(rows, positions)`` outside of which a sequence seed is
    zero (``None`` for other seeds); such a seed's zeros take no memory until read
    (:func:`lazy_zeros`)."""
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise TargetError(f"temperature must be a positive number, got {temperature!r}")
    seed = _seed(output, target, task=task, multiplier=multiplier, mode=mode,
                 thresholding=thresholding, position=position, attention_mask=attention_mask,
                 temperature=float(temperature))
    if isinstance(seed, Placed):
        return (seed.relevance, seed.support) if with_support else seed.relevance
    stacked = stack(seed) if isinstance(seed, Streams) else seed.unsqueeze(0)
    return (stacked, None) if with_support else stacked


def _seed(output: Tensor, target: Any, *, task: str, multiplier: float, mode: str,
          thresholding: float, position: Any, attention_mask: Tensor | None,
          temperature: float = 1.0) -> _Pair | Placed:
    """:func:`make_seed` as one tensor, or a :class:`Streams` pair in contrastive mode;
    sequence seeds already stacked, with their support (:class:`Placed`)."""
    if task not in TASKS:
        raise TargetError(f"unknown task {task!r}; choose one of {sorted(set(TASKS.values()))}")
    task = TASKS[task]
    if mode not in ("default", "contrastive"):
        raise TargetError(f"unknown mode {mode!r}; choose 'default' or 'contrastive'")
    if not output.is_floating_point():
        raise TargetError(f"the explained output must be a float tensor, got {output.dtype}")
    out = output.detach()
    if not all_finite(out):
        raise NonFiniteError("the model output holds NaN or inf: nothing sensible to explain")
    if isinstance(target, Tensor) and target.is_floating_point() and target.shape == out.shape:
        seed = target.to(out.dtype)
        return Streams(seed.clamp_min(0), (-seed).clamp_min(0)) if mode == "contrastive" else seed
    if temperature != 1.0:  # (METHOD §1: every probability the seed uses; argmax and |out|
        out = out / temperature  # proportions do not change)
    m = float(multiplier)
    if task == "multiclass" and out.dim() == 3:
        return _sequence(out, target, m, mode, position, attention_mask)
    if task in ("multiclass", "binary"):
        if out.dim() == 1:
            out = out.unsqueeze(0) if task == "multiclass" else out.unsqueeze(-1)
            return _reshape(_classify(out, target, task, m, mode), output.shape)
        if out.dim() != 2:
            raise TargetError(
                f"{task} seeding expects an output [batch, classes], got {tuple(out.shape)}; "
                "pass an explicit seed tensor shaped like the output, or another task"
            )
        return _classify(out, target, task, m, mode)
    if task in ("regression", "detection"):
        return _regression(out, target, m, mode)
    return _segmentation(out, target, m, mode, thresholding)


def sequence_positions(out: Tensor, position: Any = None,
                       attention_mask: Tensor | None = None) -> Tensor:
    """The explained position of each row of sequence logits ``out`` [batch, positions,
    vocab]: ``position`` (an int or one per row; negative counts from the end), by default
    the last position — or, given the model's 2-D ``attention_mask``, each row's last real
    token (right-padded rows end in padding). A position on padding is a
    :class:`TargetError`."""
    B, T = out.shape[:2]
    mask = attention_mask
    if mask is not None and (mask.dim() != 2 or tuple(mask.shape) != (B, T)):
        mask = None  # not a [batch, positions] padding mask (e.g. 4-D or cached)
    if mask is not None:
        mask = mask.to(out.device) != 0
        empty = ~mask.any(-1)
        if bool(empty.any()):
            raise TargetError(f"rows {empty.nonzero().flatten().tolist()} of the "
                              "attention_mask hold no real token: nothing to explain there")
    if position is None:
        if mask is None:
            return torch.full((B,), T - 1, dtype=torch.long, device=out.device)
        steps = torch.arange(T, device=out.device)
        return torch.where(mask, steps, -1).amax(-1)  # the last real token of each row
    pos = torch.as_tensor(position, device=out.device).long().reshape(-1)
    if pos.numel() == 1:
        pos = pos.expand(B)
    if pos.numel() != B:
        raise TargetError(f"position must be an int or one per batch row ({B}), got {position!r}")
    pos = torch.where(pos < 0, pos + T, pos)
    if bool(((pos < 0) | (pos >= T)).any()):
        raise TargetError(f"position {position!r} out of range for {T} positions")
    if mask is not None:
        rows = torch.arange(B, device=out.device)
        pad = ~mask[rows, pos]
        if bool(pad.any()):
            bad = pad.nonzero().flatten().tolist()
            raise TargetError(
                f"position {position!r} points at padding in rows {bad} (attention_mask is 0 "
                "there): the prediction at a pad position explains nothing. Omit position= "
                "to explain each row's last real token, or give one position per row."
            )
    return pos


def logits_window(arguments: Mapping[str, Any], out: Tensor) -> tuple[Tensor, int] | None:
    """The input positions the sequence output ``out`` ([batch, n, vocab]) holds, and the
    input's length, when the call computed logits for some positions only —
    transformers' ``logits_to_keep`` argument: an int ``n`` (the last ``n`` positions) or
    a 1-D tensor of positions — else ``None`` (``out`` holds every position)."""
    keep = arguments.get("logits_to_keep")
    if isinstance(keep, Tensor) and keep.dtype == torch.bool:
        raise TargetError(
            "the forward ran with a boolean logits_to_keep, which flattens the kept logits "
            "of every row into one [positions, vocab] tensor: explain a forward with an int "
            "or a tensor of positions instead")
    if keep is None or isinstance(keep, bool) or out.dim() != 3:
        return None
    length = next((t.shape[1] for t in (arguments.get(k) for k in _SEQUENCE_INPUTS)
                   if isinstance(t, Tensor) and t.dim() >= 2), None)
    n = out.shape[1]
    if length is None or n == length:
        return None
    if isinstance(keep, int) and keep == n:
        return torch.arange(length - n, length, device=out.device), length
    if isinstance(keep, Tensor) and keep.dim() == 1 and keep.numel() == n:
        return keep.to(out.device).long(), length
    raise TargetError(
        f"the model returned logits for {n} of the input's {length} positions, which "
        f"logits_to_keep={keep!r} does not explain: pass logits_to_keep as an int or a "
        "1-D tensor of positions (0 keeps every position)")


_SEQUENCE_INPUTS = ("input_ids", "inputs_embeds", "attention_mask")


def window_positions(out: Tensor, kept: Tensor, length: int, position: Any = None,
                     attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """:func:`sequence_positions` for an output that holds the input positions ``kept``
    only (:func:`logits_window`): ``position`` and the mask are in the input's
    ``length`` positions, as for a full output. Returns the index of each row's position
    among ``out``'s, and the position itself; a position the model computed no logits
    for is a :class:`TargetError`."""
    whole = sequence_positions(out.new_empty(out.shape[0], length, 0), position,
                               attention_mask)
    match = kept.to(whole.device) == whole[:, None]
    missing = ~match.any(-1)
    if bool(missing.any()):
        raise TargetError(
            f"position(s) {whole[missing].tolist()} of rows {missing.nonzero().flatten().tolist()}"
            f" have no logits: the model computed them for positions {kept.tolist()[:8]}"
            f"{' ...' if kept.numel() > 8 else ''} only (logits_to_keep). Explain one of "
            "those, or run the forward with logits_to_keep=0 (every position).")
    return match.int().argmax(-1), whole


def _sequence(out: Tensor, target: Any, m: float, mode: str, position: Any,
              attention_mask: Tensor | None = None) -> Placed:
    """Logits [batch, positions, vocab] (language models): the target token at each row's
    position (:func:`sequence_positions`), stacked, zero elsewhere (:func:`lazy_zeros`)."""
    B = out.shape[0]
    pos = sequence_positions(out, position, attention_mask)
    rows = torch.arange(B, device=out.device)
    at = _classify(out[rows, pos], target, "multiclass", m, mode)
    parts = [at.pos, at.neg] if isinstance(at, Streams) else [at]
    z = lazy_zeros((len(parts), *out.shape), out.dtype, out.device)
    z[:, rows, pos] = torch.stack(parts)
    return Placed(z, (rows, pos))


def _reshape(rel: _Pair, shape) -> _Pair:
    if isinstance(rel, Streams):
        return Streams(rel.pos.reshape(shape), rel.neg.reshape(shape))
    return rel.reshape(shape)


def row_targets(out: Tensor, target: Any) -> Tensor:
    """One class index per batch row of ``out`` [batch, classes]."""
    B, C = out.shape
    if target is None:
        return out.argmax(dim=-1)  # (in range by construction)
    if isinstance(target, (str, bytes)):
        raise TargetError(
            f"target {target!r} is text: give the class or token id (e.g. "
            "tokenizer.convert_tokens_to_ids(token)), or None for the argmax")
    if isinstance(target, int) or (isinstance(target, Tensor) and target.dim() == 0):
        idx = torch.full((B,), int(target), dtype=torch.long, device=out.device)
    elif isinstance(target, (Sequence, Tensor)):
        idx = torch.as_tensor(list(target) if not isinstance(target, Tensor) else target)
        if idx.dim() != 1 or idx.numel() != B or idx.is_floating_point():
            raise TargetError(
                f"target must be None, an int, one int per batch row ({B}), or a seed tensor "
                f"shaped like the output {tuple(out.shape)}; got {target!r}"
            )
        idx = idx.to(out.device, torch.long)
    else:
        raise TargetError(f"unsupported target {target!r}")
    if bool(((idx < -C) | (idx >= C)).any()):
        raise TargetError(f"target {idx.tolist()} out of range for {C} output units")
    return torch.where(idx < 0, idx + C, idx)  # negative indices count from the end


def _classify(out: Tensor, target: Any, task: str, m: float, mode: str) -> _Pair:
    B, C = out.shape
    if task == "binary" and C == 1:
        if target not in (None, 0):
            raise TargetError("a single-output binary model has only unit 0 to explain")
        pos = torch.full_like(out, m)
        if mode == "default":
            return pos
        return Streams(pos, m * (1 - torch.sigmoid(out)))
    idx = row_targets(out, target)
    pos = torch.zeros_like(out)
    pos[torch.arange(B), idx] = m
    if mode == "default":
        return pos
    p = torch.softmax(out.double(), dim=-1)
    p[torch.arange(B), idx] = 0
    neg = (m * p / p.sum(-1, keepdim=True).clamp_min(1e-300)).to(out.dtype)
    return Streams(pos, neg)


def _regression(out: Tensor, target: Any, m: float, mode: str) -> _Pair:
    B = out.shape[0]
    flat = out.reshape(B, -1)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if target is not None:
        mask = torch.zeros_like(flat, dtype=torch.bool)
        idx = torch.as_tensor(target).reshape(-1).long()
        if bool(((idx < 0) | (idx >= flat.shape[1])).any()):
            raise TargetError(f"target units {idx.tolist()} out of range for {flat.shape[1]}")
        mask[:, idx] = True
    mag = torch.where(mask, flat.abs(), 0.0)
    total = mag.sum(-1, keepdim=True)
    if bool((total == 0).any()):
        raise TargetError("the chosen regression outputs are all 0 in some row: nothing to seed")
    seed = (m * mag / total).reshape(out.shape)
    if mode == "default":
        return seed
    return Streams(torch.where(out >= 0, seed, 0.0), torch.where(out < 0, seed, 0.0))


def _segmentation(out: Tensor, target: Any, m: float, mode: str, thr: float) -> _Pair:
    if out.dim() < 3:
        raise TargetError(f"segmentation expects [batch, classes, *pixels], got {tuple(out.shape)}")
    B, C = out.shape[:2]
    probs = torch.sigmoid(out) if C == 1 else torch.softmax(out, dim=1)
    if target is None:
        cls = probs.argmax(dim=1, keepdim=True)
    else:
        if not 0 <= int(target) < C:
            raise TargetError(f"segmentation class {target} out of range for {C} classes")
        cls = torch.full_like(probs[:, :1], int(target), dtype=torch.long)
    chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, cls, True)
    mask = chosen & (probs > thr)
    count = mask.reshape(B, -1).sum(-1)
    if bool((count == 0).any()):
        empty = (count == 0).nonzero().flatten().tolist()
        best = torch.where(chosen, probs, 0.0).reshape(B, -1).amax(-1)
        low = float(best[empty].min())
        raise TargetError(
            f"no pixel's probability exceeds thresholding={thr} in rows {empty}: the model is "
            f"unsure everywhere there (the highest probability of the explained class is "
            f"{low:.3g}); pass a thresholding below that, e.g. thresholding={low * 0.9:.3g}")
    seed = mask.to(out.dtype) * (m / count.to(out.dtype)).view(B, *([1] * (out.dim() - 1)))
    if mode == "default":
        return seed
    return Streams(seed, torch.zeros_like(seed))
