"""Explaining a tape: seed the chosen output, run the :class:`~dlbhooks.engine.Engine`
over the records in reverse, and assemble the :class:`~dlbhooks.results.Explanation`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .engine import Engine
from .errors import (
    NonFiniteError,
    OutOfMemoryError,
    TargetError,
    is_out_of_memory,
    memory_advice,
)
from .footprint import record_bytes
from .relevance import Streams, all_finite, has_nan, net, to_float
from .results import Explanation
from .seeds import TASKS, make_seed, sequence_positions

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
) -> Explanation:
    """Propagate relevance from the last recorded model call back to its inputs.

    ``target``: what to explain, per ``task`` (``"multiclass"``, ``"binary"``,
    ``"regression"``, ``"detection"``, ``"segmentation"``; README, "Targets and tasks").
    ``mode``: ``"default"`` or ``"contrastive"``; ``multiplier``: relevance seeded per
    batch row; ``saturation``: the saturation rule of the weighted sums (default mode);
    ``thresholding``: segmentation's pixel threshold; ``scaler``: rescales what
    ``Explanation.at`` returns; ``keep=False`` keeps no per-module tensors; ``output``: the
    model output to explain (name or index); ``position``: the sequence position of a
    ``[batch, T, vocab]`` output (default: the last unmasked one).

    ``share=True`` keeps forward-only quantities (the weighted-sum denominators) on the
    tape for later explanations of the same forward (several targets): faster from the
    second target on, at the cost of about one more copy of the layers' activations
    (``tape.shared.clear()`` frees it)."""
    root = tape.last_root()
    if not root.done:
        raise TargetError("the recorded forward did not finish (it raised): nothing to explain")
    for name, t in zip(root.input_names, root.inputs):
        if t.is_floating_point() and has_nan(t):
            raise NonFiniteError(
                f"model input {name!r} holds NaN; relevance would be meaningless. "
                "Clean the input (torch.nan_to_num) before explaining."
            )
    k = select_output(root, output)
    with tape.store.loaded([root.outputs[k]]):  # the output's own device and dtype
        mask = root.arguments.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) else None
        seed = make_seed(
            root.outputs[k], target, task=task, multiplier=multiplier, mode=mode,
            thresholding=thresholding, position=position, attention_mask=mask,
        )
        resolved = _resolved_target(root.outputs[k], target, task, position, mask)
        info = {"task": task, "saturation": saturation, "output": root.output_names[k]}
        if root.outputs[k].dim() == 3 and TASKS.get(task) == "multiclass":
            info["position"] = sequence_positions(root.outputs[k], position, mask).tolist()
        seed_like = seed.pos if isinstance(seed, Streams) else seed
    engine = Engine(tape, mode=mode, saturation=saturation, keep=keep, share=share)
    R_out = [seed if i == k else None for i in range(len(root.outputs))]
    try:
        # relevance is not differentiated: no autograd graph, even for a tape recorded
        # with grad=True or an explanation asked for inside torch.inference_mode()
        with torch.inference_mode(False), torch.no_grad(), tape.store.checks():
            R_in = engine.propagate(root, R_out)
            engine.finish()
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        where = f"while explaining {engine.current.describe()}" if engine.current else ""
        raise OutOfMemoryError(
            memory_advice(where or "while explaining", str(tape.store.policy),
                          record_bytes(tape))
        ) from err

    inputs, pos, neg = {}, {}, {}
    for name, t, R in zip(root.input_names, root.inputs, R_in):
        if R is not None and t.is_floating_point() and not all_finite(t):
            raise NonFiniteError(
                f"model input {name!r} holds inf and relevance reached it; relevance would be "
                "meaningless. Clean the input (torch.nan_to_num) before explaining."
            )
        if R is None:
            R = torch.zeros(t.shape, dtype=seed_like.dtype, device=tape.store.device_of(t))
            R = Streams(R, R.clone()) if mode == "contrastive" else R
        inputs[name] = net(R)
        if isinstance(R, Streams):
            pos[name], neg[name] = R.pos, R.neg
    ledger = [e for e in engine.ledger if e is not None]
    layers = {e.key: _net(e.relevance_in) for e in ledger if e.path}
    absorbing = [e for e in ledger if e.leaf or e.absorbed not in (0.0, (0.0, 0.0))]
    absorbed = {e.key: _net(e.absorbed) for e in absorbing}
    streams = mode == "contrastive"
    tensors = {
        key: [None if r is None else net(r) for r in rs]
        for key, rs in engine.kept.items() if key != "<root>"
    }
    return Explanation(
        inputs=inputs, layers=layers, absorbed=absorbed, mode=mode,
        multiplier=float(multiplier), positive=pos or None, negative=neg or None,
        absorbed_positive={e.key: e.absorbed[0] for e in absorbing} if streams else None,
        absorbed_negative={e.key: e.absorbed[1] for e in absorbing} if streams else None,
        target=resolved, ledger=ledger,
        tensors=tensors, scaler=scaler,
        info=info,
        heads={k2: net(v) for k2, v in engine.reports.get("heads", {}).items()},
        experts={k2: net(v) for k2, v in engine.reports.get("experts", {}).items()},
        routing=dict(engine.reports.get("routing", {})),
        blocks={
            k2: {name: _net(to_float(v)) for name, v in d.items()}
            for k2, d in engine.reports.get("blocks", {}).items()
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
    if isinstance(target, Tensor):
        return target.tolist() if target.numel() <= 64 else f"tensor{tuple(target.shape)}"
    return target
