"""How many bytes the records of a tape keep alive (:func:`record_bytes`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from .binding import tensor_leaves

if TYPE_CHECKING:
    from .records import Tape


def _tape_tensors(tape: Tape):
    for rec in tape.records:
        if rec.released:  # (tape.explain(release=True) dropped them)
            continue
        yield rec.type_name, rec.inputs
        yield rec.type_name, rec.outputs
        yield rec.type_name, list(rec.snapshots.values())
        yield rec.type_name, [t for _, t in tensor_leaves(rec.arguments)]


def record_bytes(tape: Tape, by_type: bool = False) -> int | dict[str, int]:
    """Bytes the records of ``tape`` keep alive: each storage counted once, the model's
    own parameters and buffers excluded. With ``by_type``, split by the module type that
    first recorded each storage."""
    own = set()
    for t in list(tape.model.parameters()) + list(tape.model.buffers()):
        try:
            own.add(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            continue
    seen: dict[int, tuple[str, int]] = {}
    for type_name, tensors in _tape_tensors(tape):
        for t in tensors:
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr and ptr not in own and ptr not in seen:
                seen[ptr] = (type_name, st.nbytes())
    if not by_type:
        return sum(n for _, n in seen.values())
    out: dict[str, int] = {}
    for type_name, n in seen.values():
        out[type_name] = out.get(type_name, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
