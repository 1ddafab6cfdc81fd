"""Explaining a tape: seed the chosen output, run the :class:`~dlbhooks.engine.Engine`
over the records in reverse, and assemble the :class:`~dlbhooks.results.Explanation`."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import scratch
from .engine import Engine
from .errors import (
    NonFiniteError,
    OutOfMemoryError,
    RecordModifiedError,
    RecordReleasedError,
    TargetError,
    TraceError,
    is_out_of_memory,
    memory_advice,
)
from .footprint import record_bytes
from .ledger import LedgerEntry
from .relevance import CURRENT_STREAMS, Rel, all_finite, has_nan, net, to_float
from .results import Explanation
from .seeds import (
    TASKS,
    lazy_zeros,
    logits_window,
    make_seed,
    sequence_positions,
    window_positions,
)
from .weights import changed_weights

if TYPE_CHECKING:
    from .records import Record, Tape


def select_output(root: Record, output: str | int | None) -> int:
    """Index (in ``root.outputs``) of the output tensor to explain."""
    names = root.output_names
    if output is None:
        if "logits" in names:
            return names.index("logits")
        for i, t in enumerate(root.outputs):
            if t.is_floating_point():
                return i
        raise TargetError(f"{root.describe()} returned no float tensor to explain")
    if isinstance(output, int):
        if not 0 <= output < len(root.outputs):
            raise TargetError(f"output {output} out of range: the model returned {len(names)}")
        return output
    if output not in names:
        raise TargetError(f"output {output!r} not among the model's outputs {names}")
    return names.index(output)


def explain_tape(
    tape: Tape,
    target: Any = None,
    *,
    mode: str = "default",
    multiplier: float = 100.0,
    saturation: bool = True,
    task: str = "multiclass",
    thresholding: float = 0.5,
    scaler: float | None = None,
    keep: bool = True,
    output: str | int | None = None,
    position: Any = None,
    share: bool = False,
    temperature: float = 1.0,
    tokenizer: Any = None,
    targets: list[Any] | None = None,
    release: bool = False,
) -> Any:
    """Propagate relevance from the last recorded model call back to its inputs.

    ``target``: what to explain, per ``task`` (``"multiclass"``, ``"binary"``,
    ``"regression"``, ``"detection"``, ``"segmentation"``; README, "Targets and tasks").
    ``mode``: ``"default"`` or ``"contrastive"``; ``multiplier``: relevance seeded per
    batch row; ``saturation``: the saturation rule of the weighted sums (default mode);
    ``thresholding``: segmentation's pixel threshold; ``scaler``: rescales what
    ``Explanation.at`` returns; ``keep=False`` keeps no per-module tensors; ``output``: the
    model output to explain (name or index); ``position``: the sequence position of a
    ``[batch, T, vocab]`` output (default: the last unmasked one).

    ``targets``: several targets (each one what ``target`` may be) explained in one
    reverse pass, which shares every product that depends on the forward only: returns a
    list of :class:`Explanation`, each equal to explaining that target alone (to rounding:
    a batched product may sum in another order). Memory grows with the number of targets
    (the relevance of every target is held at once).

    ``tokenizer``: lets ``target`` be a token string (``"▁Paris"``, or text that encodes
    as exactly one token), or a list of them per row. ``temperature``: logits are divided
    by it before every probability the seed uses (the contrastive R- split, the binary
    1 - p, segmentation's threshold; METHOD §1).

    ``share=True`` keeps forward-only quantities (the weighted-sum denominators) on the
    tape for later explanations of the same forward (several targets): faster from the
    second target on, at the cost of about one more copy of the layers' activations
    (``tape.shared.clear()`` frees it). ``release=True`` frees each record's tensors once
    the walk has passed it (as :func:`dlbhooks.explain` does): a lower peak, nothing of
    the forward left afterwards, and a tape that cannot be explained again."""
    options = dict(mode=mode, multiplier=multiplier, saturation=saturation, task=task,
                   thresholding=thresholding, scaler=scaler, keep=keep, output=output,
                   share=share, temperature=temperature, release=release)
    if targets is None:
        if tokenizer is not None:
            target = token_target(target, tokenizer)
        return explain_targets(tape, [(target, position)], **options)[0]
    targets = _checked_targets(target, targets, tokenizer)
    return explain_targets(tape, [(t, position) for t in targets], **options)


def _checked_targets(target: Any, targets: Any, tokenizer: Any) -> list[Any]:
    """``targets=`` as a list (token strings as ids); errors for a bad one."""
    if target is not None:
        raise TargetError("give target= (one target) or targets= (several), not both")
    if isinstance(targets, (str, Tensor)) or not isinstance(targets, (list, tuple)) \
            or not targets:
        raise TargetError(f"targets= must be a non-empty list of targets, got {targets!r}")
    return [token_target(t, tokenizer) for t in targets] if tokenizer is not None \
        else list(targets)


def explain_targets(
    tape: Tape,
    specs: list[tuple[Any, Any]],
    *,
    mode: str = "default",
    multiplier: float = 100.0,
    saturation: bool = True,
    task: str = "multiclass",
    thresholding: float = 0.5,
    scaler: float | None = None,
    keep: bool = True,
    output: str | int | None = None,
    share: bool = False,
    temperature: float = 1.0,
    release: bool = False,
) -> list[Explanation]:
    """One reverse pass for every ``(target, position)`` of ``specs``: the seeds stacked
    on the relevance's leading axis (targets × streams), one :class:`Explanation` each
    (the options as in :func:`explain_tape`)."""
    if release and share:
        raise TraceError("release=True frees the records that share=True keeps for later "
                         "explanations of the tape: give one or the other")
    root = _checked_root(tape)
    k = select_output(root, output)
    seeded = [_seed(tape, root, k, target, task=task, multiplier=multiplier, mode=mode,
                    thresholding=thresholding, position=position, saturation=saturation,
                    temperature=temperature) for target, position in specs]
    seed, totals = _stacked_seeds(seeded)
    for s in seeded:
        s.relevance = None  # the seed is handed to the engine, which frees it once used
    engine = Engine(tape, mode=mode, saturation=saturation, keep=keep, share=share,
                    targets=len(specs), release=release)
    if release:
        tape.start_release()
    if totals is not None:  # (a sum over every zero of a sequence seed would read them all)
        engine.note_total(seed, totals)
    R_out = [seed if i == k else None for i in range(len(root.outputs))]
    del seed
    R_in, ledgers = _run(engine, root, R_out)
    inputs = _input_relevance(tape, root, R_in, seeded[0].dtype, engine.streams * len(specs))
    if release:
        for rec in tape.records:
            rec.release()
    return [_assemble(engine, ledger, inputs, t, mode=mode, multiplier=multiplier,
                      target=s.target, scaler=scaler, info=s.info)
            for t, (s, ledger) in enumerate(zip(seeded, ledgers))]


def token_target(target: Any, tokenizer: Any) -> Any:
    """``target`` with token strings replaced by their ids (a string in the vocabulary, or
    text that encodes as exactly one token); a :class:`TargetError` otherwise."""
    if isinstance(target, (list, tuple)):
        return [token_target(t, tokenizer) for t in target]
    if not isinstance(target, str):
        return target
    tid = tokenizer.convert_tokens_to_ids(target)
    unk = getattr(tokenizer, "unk_token_id", None)
    if tid is not None and tid != unk:
        return int(tid)
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 and ids[0] != unk:
        return int(ids[0])
    raise TargetError(f"target {target!r} is not one token of the vocabulary: it encodes as "
                      f"{len(ids)} tokens {ids}; give one token (e.g. with its leading-space "
                      "mark) or its id")


def _checked_root(tape: Tape) -> Record:
    """The last recorded model call, if it finished and no float input holds NaN."""
    root = tape.last_root()
    if tape.released:
        raise RecordReleasedError(
            "this tape's records were released by an earlier explanation with release=True "
            "(dlb.explain frees them as it walks): trace the forward again to explain it "
            "again, or explain with release=False (tape.explain's default) to keep them.")
    if not root.done:
        raise TargetError("the recorded forward did not finish (it raised): nothing to explain")
    if len(tape.roots) > 1:
        warnings.warn(
            f"the tape holds {len(tape.roots)} calls of the model; explaining the last one. "
            "Trace each forward in its own `with dlb.trace(model)` block to explain it.",
            stacklevel=4)
    changed = changed_weights(tape.model, tape.weight_marks)
    if changed:
        raise RecordModifiedError(
            f"{len(changed)} weight(s) of the model changed since the recorded forward "
            f"({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}; e.g. an "
            "optimizer step): the explanation would mix the recorded activations with the new "
            "weights. Explain before updating the model, or trace the forward again.")
    for name, t in zip(root.input_names, root.inputs):
        if t.is_floating_point() and has_nan(t):
            raise NonFiniteError(
                f"model input {name!r} holds NaN; relevance would be meaningless. "
                "Clean the input (torch.nan_to_num) before explaining."
            )
    return root


@dataclass
class _Seeded:
    """The seed of output ``k`` and what the explanation reports about it."""

    relevance: Rel | None  # the seed, stacked ([2, ...] in contrastive mode); None once used
    dtype: torch.dtype  # of the relevance (for the inputs it does not reach)
    target: Any  # the target as resolved (a default becomes the arg-max classes)
    info: dict[str, Any]
    # (rows, positions) outside of which a sequence seed is zero, else None
    support: tuple[Tensor, Tensor] | None = None


def _stacked_seeds(seeded: list[_Seeded]) -> tuple[Tensor, Tensor | None]:
    """The seeds on one leading axis (targets × streams) and, when each is zero outside
    its support (sequence seeds), the per-entry totals, summed over the support only.
    Such seeds stay lazily zeroed (:func:`~dlbhooks.seeds.lazy_zeros`): only the chosen
    rows are ever written."""
    rels = [s.relevance for s in seeded]
    assert all(r is not None for r in rels)
    if any(s.support is None for s in seeded):
        return (rels[0] if len(rels) == 1 else torch.cat(rels)), None  # type: ignore[arg-type]
    first = rels[0]
    assert first is not None
    picked = [r[:, s.support[0], s.support[1]]  # type: ignore[index]
              for r, s in zip(rels, seeded)]
    totals = torch.cat([p.reshape(p.shape[0], -1).sum(1) for p in picked]).double()
    if len(rels) == 1:
        return first, totals
    S = first.shape[0]
    seed = lazy_zeros((S * len(rels), *first.shape[1:]), first.dtype, first.device)
    for t, (p, s) in enumerate(zip(picked, seeded)):
        assert s.support is not None
        seed[t * S:(t + 1) * S, s.support[0], s.support[1]] = p
    return seed, totals


def _seed(tape: Tape, root: Record, k: int, target: Any, *, task: str, multiplier: float,
          mode: str, thresholding: float, position: Any, saturation: bool,
          temperature: float = 1.0) -> _Seeded:
    """Seed ``root``'s output ``k`` for ``target`` and resolve the target and positions."""
    out = root.outputs[k]
    with tape.store.loaded([out]):  # the output's own device and dtype
        mask = root.arguments.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) else None
        shown = None  # the positions explained, in the input (if not those of ``out``)
        window = logits_window(root.arguments, out) if TASKS.get(task) == "multiclass" \
            else None
        if window is not None:  # logits of some positions only: index them among those
            position, shown = window_positions(out, *window, position, mask)
            mask = None
        seed, support = make_seed(
            out, target, task=task, multiplier=multiplier, mode=mode,
            thresholding=thresholding, position=position, attention_mask=mask,
            temperature=temperature, with_support=True,
        )
        resolved = _resolved_target(out, target, task, position, mask)
        info = {"task": task, "saturation": saturation, "output": root.output_names[k]}
        if temperature != 1.0:
            info["temperature"] = temperature
        if out.dim() == 3 and TASKS.get(task) == "multiclass":
            info["position"] = (sequence_positions(out, position, mask) if shown is None
                                else shown).tolist()
    return _Seeded(seed, seed.dtype, resolved, info, support)


def _run(engine: Engine, root: Record,
         R_out: list[Rel | None]) -> tuple[list[Rel | None], list[list[LedgerEntry]]]:
    """Relevance on ``root``'s inputs and the final ledger of each target; running out of
    memory raises :class:`~dlbhooks.errors.OutOfMemoryError` with advice."""
    tape = engine.tape
    token = CURRENT_STREAMS.set(engine.streams)
    try:
        # relevance is not differentiated: no autograd graph, even for a tape recorded
        # with grad=True or an explanation asked for inside torch.inference_mode()
        with torch.inference_mode(False), torch.no_grad(), tape.store.checks(), \
                scratch.session():
            R_in = engine.propagate(root, R_out, consume=True)
            ledgers = engine.finish_targets()
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        where = f"while explaining {engine.current.describe()}" if engine.current else ""
        raise OutOfMemoryError(
            memory_advice(where or "while explaining", str(tape.store.policy),
                          record_bytes(tape))
        ) from err
    finally:
        CURRENT_STREAMS.reset(token)
    return R_in, ledgers


def _input_relevance(tape: Tape, root: Record, R_in: list[Rel | None], dtype: torch.dtype,
                     S: int) -> dict[str, Rel]:
    """Relevance per model input, by name: zeros for an input it did not reach; raises on
    an input holding inf that it did reach."""
    inputs: dict[str, Rel] = {}
    for name, t, R in zip(root.input_names, root.inputs, R_in):
        if R is not None and t.is_floating_point() and not all_finite(t):
            raise NonFiniteError(
                f"model input {name!r} holds inf and relevance reached it; relevance would be "
                "meaningless. Clean the input (torch.nan_to_num) before explaining."
            )
        if R is None:
            R = torch.zeros((S, *t.shape), dtype=dtype, device=tape.store.device_of(t))
        inputs[name] = R
    return inputs


def _assemble(engine: Engine, ledger: list[LedgerEntry], inputs: dict[str, Rel], t: int,
              *, mode: str, multiplier: float, target: Any, scaler: float | None,
              info: dict[str, Any]) -> Explanation:
    """The :class:`Explanation` of target ``t`` of a finished engine run."""
    contrastive = mode == "contrastive"
    m = engine.streams

    def part(R: Tensor) -> Tensor:  # target t's streams
        return R if engine.targets == 1 else R[t * m:(t + 1) * m]

    def net_of(R: Tensor) -> Tensor:
        return net(part(R))

    streams = {name: part(R) for name, R in inputs.items()} if contrastive else {}
    absorbing = [e for e in ledger if e.leaf or e.absorbed not in (0.0, (0.0, 0.0))]
    reports = engine.reports
    return Explanation(
        inputs={name: net_of(R) for name, R in inputs.items()},
        layers={e.key: _net(e.relevance_in) for e in ledger if e.path},
        absorbed={e.key: _net(e.absorbed) for e in absorbing}, mode=mode,
        multiplier=float(multiplier),
        positive={name: R[0] for name, R in streams.items()} or None,
        negative={name: R[1] for name, R in streams.items()} or None,
        absorbed_positive={e.key: e.absorbed[0] for e in absorbing} if contrastive else None,
        absorbed_negative={e.key: e.absorbed[1] for e in absorbing} if contrastive else None,
        target=target, ledger=ledger,
        tensors={
            key: [None if r is None else net_of(r) for r in rs]
            for key, rs in engine.kept.items() if key != "<root>"
        },
        scaler=scaler, info=info,
        heads={k: net_of(v) for k, v in reports.heads.items()},
        experts={k: net_of(v) for k, v in reports.experts.items()},
        routing=dict(reports.routing),
        blocks={
            k: {name: _net(to_float(part(v))) for name, v in d.items()}
            for k, d in reports.blocks.items()
        },
    )


def _net(v) -> float:
    return v[0] - v[1] if isinstance(v, tuple) else float(v)


def _resolved_target(out: Tensor, target: Any, task: str, position: Any = None,
                     attention_mask: Tensor | None = None) -> Any:
    if target is None and out.dim() == 2 and task != "regression":
        return out.argmax(-1).tolist()
    if target is None and out.dim() == 3 and task in ("multiclass", "classification"):
        pos = sequence_positions(out, position, attention_mask)
        rows = torch.arange(out.shape[0], device=out.device)
        return out[rows, pos].argmax(-1).tolist()
    if isinstance(target, Tensor) and target.is_floating_point():
        return target.tolist() if target.numel() <= 64 else f"tensor{tuple(target.shape)}"
    if task in ("multiclass", "classification") and out.dim() in (2, 3) and target is not None:
        C = out.shape[-1]  # class or token indices, negative ones counted from the end
        idx = torch.as_tensor(target).long()
        return torch.where(idx < 0, idx + C, idx).tolist()
    if isinstance(target, Tensor):
        return target.tolist() if target.numel() <= 64 else f"tensor{tuple(target.shape)}"
    return target
