"""Explanations over a corpus, on one process or several (``accelerate launch`` / ``torchrun``).

    stats = corpus_expert_stats(model, batches, target="next")      # ExpertStats
    rel = corpus_token_relevance(model, batches, target="next")     # one tensor per row

``batches`` is a list of model inputs (a LongTensor of ``input_ids`` [batch, tokens] or a dict
of keyword arguments). The list is walked in *rounds* of ``num_processes × sync_every``
batches; ``accelerate``'s ``split_between_processes`` gives each process a contiguous slice of
the round, every process explains its slice, and ``accelerate.utils.gather_object`` brings
the per-batch results to every process, in batch order. Reductions then run on the gathered
per-batch results in batch order, so the arithmetic (and the float64 sums of
:class:`ExpertStats`) is the same whatever the number of processes: the merged result equals
a single-process run bit for bit, as long as each batch's explanation is itself reproducible
(same device type, dtype and thread count). See docs/corpus_runs.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .analysis.experts import ExpertStats
from .api import may_keep_some_logits, takes_logits_to_keep
from .explaining import explain_targets
from .integrations.accelerate import input_device
from .results import Explanation
from .trace import trace

Batch = Tensor | Mapping[str, Any]
#: Positions of a batch explained in one reverse pass (several targets share it).
POSITIONS_PER_PASS = 8

#: ``None`` (the model's argmax), ``"next"`` (the batch's own next token) or a callable
#: ``target(inputs, position) -> target`` given the model's keyword inputs.
Target = None | str | Callable[[dict[str, Any], int], Any]


def default_state(cpu: bool | None = None):
    """accelerate's ``PartialState`` for this process (initialised on first use).

    ``cpu=None`` runs on the CPU when ``ACCELERATE_USE_CPU`` is set or no accelerator is
    available, so that processes started by ``accelerate launch --multi_gpu`` or ``torchrun``
    on a machine without GPUs form a CPU (gloo) group instead of each running alone."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if cpu is None:
        has_acc = getattr(torch, "accelerator", None)
        available = has_acc.is_available() if has_acc is not None else torch.cuda.is_available()
        cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or not available
    state = PartialState(cpu=cpu)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != world:
        raise RuntimeError(
            f"launched as {world} processes but accelerate formed a group of "
            f"{state.num_processes}: every process would run the whole corpus. Pass cpu=True "
            "(or set ACCELERATE_USE_CPU=1) when there are no GPUs.")
    return state


def corpus_map(fn: Callable[[Any], Any], items: Sequence[Any], *, state=None,
               progress: bool = True, sync_every: int = 16,
               desc: str = "explaining") -> Iterator[Any]:
    """``fn(item)`` for every item, sharded over the processes; yields the results in item
    order on every process.

    Items are taken in rounds of ``num_processes × sync_every``: each process runs ``fn`` on
    its contiguous slice of the round (``state.split_between_processes``), then the round's
    results are gathered (``accelerate.utils.gather_object``, picklable results) and yielded
    in order. Every process must consume the iterator to the end (the gathers are
    collective). Memory: one round of results at a time. ``state``: an accelerate
    ``PartialState`` or ``Accelerator`` (default :func:`default_state`). The progress bar
    (tqdm, main process only) counts items of all processes."""
    from accelerate.utils import gather_object
    from accelerate.utils import tqdm as acc_tqdm

    if sync_every < 1:
        raise ValueError(f"sync_every must be >= 1, got {sync_every}")
    state = default_state() if state is None else state
    n, procs = len(items), state.num_processes
    show = progress and state.is_main_process
    bar = acc_tqdm(total=n, desc=desc, disable=not show, main_process_only=False) \
        if show else None
    try:
        for start in range(0, n, procs * sync_every):
            round_idx = list(range(start, min(start + procs * sync_every, n)))
            with state.split_between_processes(round_idx) as mine:
                local = []
                for i in mine:
                    local.append((i, fn(items[i])))
                    if bar is not None:  # estimate: the other processes go at the same pace
                        bar.update(min(procs, start + len(round_idx) - bar.n))
            gathered = gather_object(local) if procs > 1 else local
            if [i for i, _ in gathered] != round_idx:
                raise RuntimeError(f"gathered items {[i for i, _ in gathered]} do not match "
                                   f"the round {round_idx}")
            if bar is not None:
                bar.n = start + len(round_idx)
                bar.refresh()
            for _, result in gathered:
                yield result
    finally:
        if bar is not None:
            bar.close()


def _model_inputs(batch: Batch, device: torch.device) -> dict[str, Any]:
    if isinstance(batch, Tensor):
        batch = {"input_ids": batch}
    out = {}
    for k, v in batch.items():
        if isinstance(v, Tensor):
            v = v.to(device)
            if v.dim() == 1 and k in ("input_ids", "attention_mask"):
                v = v[None]
        out[k] = v
    return out


@torch.no_grad()
def explain_batch(model: nn.Module, batch: Batch, *, target: Target = None,
                  positions: int | Sequence[int] = -1, storage: Any = None, **explain_kwargs
                  ) -> tuple[list[Explanation], Tensor | None]:
    """Explanations of one batch, one per position (one recorded forward for all), and the
    attention mask of the tokens the model read (``None`` if the batch has none).

    ``target="next"``: every row holds one token more than the model reads; the model reads
    ``input_ids[:, :-1]`` (other [batch, tokens] inputs are cut alike) and the target at
    position ``p`` is the true next token ``input_ids[:, p + 1]``. ``target=None``: the
    model's own argmax at each position. A callable gets the model's keyword inputs and the
    position. ``storage`` is :func:`dlbhooks.trace`'s record storage policy.
    ``explain_kwargs`` go to ``tape.explain`` (``keep=False`` unless given). Up to
    :data:`POSITIONS_PER_PASS` positions are explained in one reverse pass (several targets,
    ``tape.explain(targets=...)``); more passes share the denominators (``share=True``,
    unless given), one pass frees the records behind its walk (``release=True``)."""
    inputs = _model_inputs(batch, input_device(model))  # (accelerate-aware)
    pos_list = [positions] if isinstance(positions, int) else list(positions)
    ids = inputs.get("input_ids")
    full = ids
    if target == "next":
        if ids is None or ids.shape[1] < 2:
            raise ValueError("target='next' needs input_ids with at least 2 tokens per row")
        rows, length = ids.shape[:2]
        inputs = {k: v[:, :-1] if isinstance(v, Tensor) and v.dim() >= 2
                  and tuple(v.shape[:2]) == (rows, length) else v for k, v in inputs.items()}
        ids = inputs["input_ids"]
    elif isinstance(target, str):
        raise ValueError(f"unknown target {target!r}: None, 'next' or a callable")
    explain_kwargs.setdefault("keep", False)
    passes = -(-len(pos_list) // POSITIONS_PER_PASS)
    explain_kwargs.setdefault("share", passes > 1)
    # one pass explains the tape once: its records are freed behind the walk
    explain_kwargs.setdefault("release", passes == 1 and not explain_kwargs["share"])
    with trace(model, storage=storage) as tape:
        model(**inputs, **_explained_logits(model, inputs, pos_list, explain_kwargs))
    specs = []
    for p in pos_list:
        if target == "next":
            length = ids.shape[1]
            pa = p + length if p < 0 else p
            if not 0 <= pa < length:
                raise ValueError(f"position {p} out of range for {length} tokens")
            specs.append((full[:, pa + 1].tolist(), pa))
        elif callable(target):
            specs.append((target(inputs, p), p))
        else:
            specs.append((None, p))
    exps: list[Explanation] = []
    for i in range(0, len(specs), POSITIONS_PER_PASS):  # several positions per reverse pass
        exps += explain_targets(tape, specs[i:i + POSITIONS_PER_PASS], **explain_kwargs)
    return exps, inputs.get("attention_mask")


def _explained_logits(model: nn.Module, inputs: Mapping[str, Any], positions: list[int],
                      options: Mapping[str, Any]) -> dict[str, Any]:
    """``{"logits_to_keep": ...}``: the logits of the explained positions only (the last
    ``n`` as an int, else their indices), for a causal LM explained at token positions by
    class (the default task and output); ``{}`` otherwise."""
    ids = inputs.get("input_ids")
    if not isinstance(ids, Tensor) or ids.dim() != 2 \
            or not may_keep_some_logits(inputs, options) or not takes_logits_to_keep(model):
        return {}
    length = ids.shape[1]
    kept = sorted({p + length if p < 0 else p for p in positions})
    if not kept or kept[0] < 0 or kept[-1] >= length:
        return {}  # (out of range: the explanation says so)
    n = len(kept)
    if kept == list(range(length - n, length)):
        return {"logits_to_keep": n}
    # (on the CPU: it indexes the last layer's output, which a device map may put on
    # another device than the inputs)
    return {"logits_to_keep": torch.tensor(kept)}


def batch_expert_stats(exps: list[Explanation], mask: Tensor | None) -> ExpertStats:
    """ExpertStats of one batch's explanations (padding excluded by ``mask``)."""
    stats = ExpertStats()
    for exp in exps:
        stats.add(exp, mask=mask)
    return stats


def batch_token_relevance(exps: list[Explanation], input_name: str = "input_ids",
                          single: bool = True) -> Tensor:
    """Relevance of ``input_name`` on CPU: [rows, tokens] (``single``, one explanation) or
    [rows, positions, tokens]."""
    if input_name not in exps[0].inputs:
        raise KeyError(f"no input {input_name!r} among {list(exps[0].inputs)}")
    rel = torch.stack([e.inputs[input_name].detach().cpu() for e in exps], dim=1)
    return rel[:, 0] if single else rel  # [rows, tokens] or [rows, positions, tokens]


def merge_in_order(parts: Iterator[ExpertStats] | Sequence[ExpertStats]) -> ExpertStats:
    """Per-batch ExpertStats merged in the given order (the order fixes the float64 sums)."""
    total = ExpertStats()
    for part in parts:
        total.merge(part)
    return total


def corpus_expert_stats(model: nn.Module, batches: Sequence[Batch], *, target: Target = None,
                        positions: int | Sequence[int] = -1, mode: str = "default",
                        state=None, progress: bool = True, sync_every: int = 16,
                        **explain_kwargs) -> ExpertStats:
    """:class:`ExpertStats` over ``batches``, on every process, equal to a single-process run.

    Each batch's explanations (one per position, see :func:`explain_batch`) are added to a
    per-batch ExpertStats (padding excluded by the batch's ``attention_mask``); the per-batch
    stats are gathered and merged in batch order (:func:`corpus_map`)."""
    def fn(batch: Batch) -> ExpertStats:
        return batch_expert_stats(*explain_batch(model, batch, target=target,
                                                 positions=positions, mode=mode,
                                                 **explain_kwargs))

    return merge_in_order(corpus_map(fn, batches, state=state, progress=progress,
                                     sync_every=sync_every, desc="expert stats"))


def corpus_token_relevance(model: nn.Module, batches: Sequence[Batch], *,
                           target: Target = None, positions: int | Sequence[int] = -1,
                           mode: str = "default", input_name: str = "input_ids", state=None,
                           progress: bool = True, sync_every: int = 16,
                           **explain_kwargs) -> list[Tensor]:
    """Relevance per input token of every row (document) of ``batches``, in corpus order
    (batch by batch, row by row), on every process: a list of CPU tensors, [tokens] for one
    position or [positions, tokens] for a list of positions."""
    single = isinstance(positions, int)

    def fn(batch: Batch) -> Tensor:
        exps, _ = explain_batch(model, batch, target=target, positions=positions, mode=mode,
                                **explain_kwargs)
        return batch_token_relevance(exps, input_name, single)

    out: list[Tensor] = []
    for rel in corpus_map(fn, batches, state=state, progress=progress, sync_every=sync_every,
                          desc="token relevance"):
        out.extend(rel.unbind(0))
    return out


def windows(ids: Tensor, n: int, length: int, seed: int = 0) -> Tensor:
    """``n`` windows of ``length`` tokens at random (seeded) offsets of a 1-D token stream:
    the same on every process."""
    if ids.numel() <= length:
        raise ValueError(f"the stream ({ids.numel()} tokens) is not longer than {length}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (n,), generator=g)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


def chunk(rows: Tensor, batch_size: int) -> list[Tensor]:
    """Consecutive batches of ``batch_size`` rows (the last may be smaller)."""
    return [rows[i:i + batch_size] for i in range(0, rows.shape[0], batch_size)]
