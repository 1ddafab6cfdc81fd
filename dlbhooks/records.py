"""What one module call stored (:class:`Record`) and the tape of a traced forward (:class:`Tape`).

Records keep inputs and outputs by reference (no copies). A record also keeps the
``_version`` of each tensor when it was seen, so a rule that reads values can tell if the
model later changed them in place (``out += identity``), and the clones ("snapshots") a
composite rule asked for before such a change. Weights are read through
:func:`dlbhooks.weights.fetch_param` only, so that offloading integrations have one place
to hook into.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .binding import bind_arguments, tensor_leaves  # noqa: F401 (re-exported: old home)
from .errors import RecordModifiedError, TraceError
from .explaining import explain_tape
from .rules.functions import FunctionCall
from .storage import Storage, Store, version_of
from .views import base_to_view, dense, may_be_view_of, view_to_base  # noqa: F401 (old home)
from .weights import (  # noqa: F401 (re-exported: the old home of weight access)
    ABS_WEIGHTS,
    all_positive,
    fetch_abs_param,
    fetch_param,
    set_weight_cache,
)

if TYPE_CHECKING:
    from .rules.registry import RuleOverlay


#: The rest of the message when a recorded input / output changed after the call.
_MODIFIED = {
    "input": "; its recorded values are no longer what the module saw. Register a composite "
             "rule for the parent module that snapshots it (snapshot=...).",
    "output": " (e.g. `out += identity` or an in-place activation) and no snapshot was "
              "taken. Give the parent's composite rule snapshot=('<child name>',).",
}


@dataclass(eq=False, repr=False)
class Record:
    """One call of one module: what went in, what came out, and what ran inside it."""

    index: int
    path: str
    # the nn.Module called (Any: a rule reads the attributes of its own module type)
    module: Any
    call: int
    parent: Record | None
    arguments: dict[str, Any]
    input_names: list[str]
    inputs: list[Tensor]
    in_versions: list[int]
    outputs: list[Tensor] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    out_versions: list[int] = field(default_factory=list)
    output: Any = None
    children: list[Record] = field(default_factory=list)
    snapshots: dict[int, Tensor] = field(default_factory=dict)
    # input/output index -> recorded tensor it is a view of (when no record produced it)
    input_views: dict[int, Tensor] = field(default_factory=dict)
    output_views: dict[int, Tensor] = field(default_factory=dict)
    done: bool = False

    @property
    def key(self) -> str:
        """Unique name of the call: the module path, with ``#k`` for the k-th repeat."""
        name = self.path or "<root>"
        return name if self.call == 0 else f"{name}#{self.call}"

    def __repr__(self) -> str:
        return f"Record({self.key!r}, {self.type_name}, {len(self.children)} children)"

    @property
    def type_name(self) -> str:
        if isinstance(self.module, FunctionCall):
            return self.module.name
        return type(self.module).__name__

    def describe(self) -> str:
        if isinstance(self.module, FunctionCall):
            return (f"'{self.path}' (torch function {self.module.name}, called at "
                    f"{self.module.where})")
        return f"'{self.path or '<root>'}' ({type(self.module).__module__}.{self.type_name})"

    def path_of(self, name: str) -> str:
        """The module path of this record's descendant at relative path ``name``."""
        return f"{self.path}.{name}" if self.path else name

    def child(self, name: str, call: int = 0, *, direct: bool = False,
              lift: bool = False) -> Record | None:
        """The ``call``-th record of the child (or descendant) at relative path ``name``,
        ``None`` if there is none.

        ``direct``: look among this record's own children only, not the whole subtree (a
        composite of a whole model looks children up often). ``lift``: return the child of
        this record that holds the one found (itself when it is a direct child): the unit a
        composite walks when ``name`` is nested (``"conv.3"``) or called through a wrapper.
        """
        full = self.path_of(name)
        seen = 0
        for r in self.children if direct else self.descendants():
            if r.path == full:
                if seen == call:
                    break
                seen += 1
        else:
            return None
        while lift and r.parent is not self:
            r = r.parent
        return r

    def descendants(self) -> Iterator[Record]:
        """Every record below this one, depth first, in call order."""
        for c in self.children:
            yield c
            yield from c.descendants()

    def input_value(self, i: int = 0) -> Tensor:
        """Input ``i`` as the module saw it; raises if it was modified in place since."""
        return self._unchanged("input", i, self.inputs[i], self.in_versions[i])

    def output_value(self, i: int = 0) -> Tensor:
        """Output ``i`` as the module returned it (the snapshot if one was taken)."""
        if i in self.snapshots:
            return self.snapshots[i]
        return self._unchanged("output", i, self.outputs[i], self.out_versions[i])

    def _unchanged(self, kind: str, i: int, t: Tensor, version: int) -> Tensor:
        """``t`` (input or output ``i``), if its version is still the recorded one."""
        if version_of(t) != version:
            raise RecordModifiedError(
                f"{kind} {i} of {self.describe()} was modified in place after the call"
                + _MODIFIED[kind])
        return t

    def output_intact(self, i: int = 0) -> bool:
        return i in self.snapshots or version_of(self.outputs[i]) == self.out_versions[i]


@dataclass(eq=False, repr=False)
class Tape:
    """All records of the forwards run inside one :func:`dlbhooks.trace` block."""

    model: nn.Module
    store: Store = field(default_factory=lambda: Store(Storage()))
    # rules for this tape only, consulted before the global registry (``dlb.trace(rules=)``)
    rules: RuleOverlay | None = None
    records: list[Record] = field(default_factory=list)
    roots: list[Record] = field(default_factory=list)
    # id(tensor) -> (view tensor, base tensor): inputs that are views of a produced tensor
    views: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # id(tensor) -> records that consumed it (leaf records only are used for saturation)
    consumers: dict[int, list[Record]] = field(default_factory=dict)
    # id(tensor) -> the leaf records that returned it, in call order, with which output:
    # an in-place module or function (ReLU(inplace=True), ``x.sub_(1)``) returns its input,
    # so it is the tensor's producer from then on (each at its own version)
    producers: dict[int, list[tuple[Record, int]]] = field(default_factory=dict)
    # id(copy) -> (copy, original): tensors accelerate moved between devices inside a
    # module's forward (relevance on the copy belongs to the original, on its device)
    aliases: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # record index -> forward-only quantities rules keep for later explanations
    # (``tape.explain(share=True)``: several targets on one recorded forward)
    shared: dict[int, dict] = field(default_factory=dict)
    # the parameters' (version, data pointer) when the trace ended (weights.weight_marks):
    # an explanation refuses weights changed since the forward
    weight_marks: dict[str, tuple[int, int]] = field(default_factory=dict)
    _produced: dict[int, Tensor] = field(default_factory=dict)
    # ids of produced tensors derived from the forward's inputs (a record with a derived
    # input makes derived outputs): the others are constants for relevance (a position
    # table looked up with positions, masks)
    _derived: set[int] = field(default_factory=set)
    _storages: dict[int, list[Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # records point at their parent and their children: a cycle, which would keep
        # every recorded tensor alive after the tape is dropped until Python's cycle
        # collector runs (gigabytes per tape of a long input, in a loop of explanations).
        # Unlinked when the tape goes, they go with it.
        weakref.finalize(self, _unlink, self.records)

    def __repr__(self) -> str:
        return f"Tape({type(self.model).__name__}, {len(self.records)} records)"

    #: ``tape.explain(target, mode=..., ...)``: explain the last recorded call of the model
    #: (:func:`dlbhooks.explaining.explain_tape`, the tape as its first argument, defined
    #: there once so that its signature and documentation are not repeated here)
    explain = explain_tape

    # -- bookkeeping used by the tracer ---------------------------------------------------
    def produce(self, t: Tensor) -> None:
        self._produced[id(t)] = t
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return
        if ptr:
            self._storages.setdefault(ptr, []).append(t)

    def resolve(self, t: Tensor) -> Tensor | None:
        """The recorded tensor that ``t`` (not produced by a record) is a view of, if any."""
        if id(t) in self._produced:
            return None
        if id(t) in self.views:
            return self.views[id(t)][1]
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None
        for base in reversed(self._storages.get(ptr, [])):
            if may_be_view_of(t, base):
                self.views[id(t)] = (t, base)
                return base
        return None

    def alias(self, t: Tensor, candidates: list[Tensor]) -> Tensor | None:
        """Note ``t`` as a device copy of the first candidate with the same shape, dtype
        and values (not the same object); return that original, if any."""
        if id(t) in self.aliases:
            return self.aliases[id(t)][1]
        for c in candidates:
            if c is t or c.shape != t.shape or c.dtype != t.dtype:
                continue
            if torch.equal(c.to(t.device), t):
                while id(c) in self.aliases:  # a copy of a copy: back to the original
                    c = self.aliases[id(c)][1]
                self.aliases[id(t)] = (t, c)
                return c
        return None

    def is_produced(self, t: Tensor) -> bool:
        return id(t) in self._produced

    def derive(self, t: Tensor) -> None:
        """Mark ``t`` (produced) as derived from the forward's inputs."""
        self._derived.add(id(t))

    def is_derived(self, t: Tensor) -> bool:
        """Is ``t`` derived from the forward's inputs: produced by a record that read a
        derived tensor, a view of such a tensor, or a device copy of one?"""
        if id(t) in self._derived:
            return True
        if id(t) in self._produced:
            return False
        if self.store.active:  # records hold copies: ``t`` as the forward sees it -> its copy
            kept = self.store.kept(t)
            if kept is not None and kept is not t:
                return self.is_derived(kept)
        if id(t) in self.aliases:
            return self.is_derived(self.aliases[id(t)][1])
        base = self.resolve(t)
        return base is not None and id(base) in self._derived

    def last_root(self) -> Record:
        if not self.roots:
            raise TraceError(
                "the tape holds no call of the traced model: run the model inside the "
                "`with dlb.trace(model) as tape:` block before calling tape.explain()."
            )
        return self.roots[-1]


def _unlink(records: list[Record]) -> None:
    """Cut the parent/children links of a dropped tape's records (see ``Tape``)."""
    for rec in records:
        rec.parent = None
        rec.children = []
