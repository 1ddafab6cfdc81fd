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
from .errors import RecordModifiedError, RecordReleasedError, TraceError
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
    # the enclosing call, weakly: a strong link both ways would be a reference cycle,
    # which keeps every recorded tensor alive after the tape is dropped until Python's
    # cycle collector runs (gigabytes per tape of a long input, in a loop of explanations)
    parent_ref: weakref.ReferenceType[Record] | None
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
    # (input ids, output ids) once the tensors are released (:meth:`release`), else None
    _ids: tuple[list[int], list[int]] | None = None

    @property
    def parent(self) -> Record | None:
        """The call this one ran inside (``None`` for a model call)."""
        return None if self.parent_ref is None else self.parent_ref()

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

    # -- releasing the recorded tensors (an explanation with release=True) --------------------
    @property
    def released(self) -> bool:
        """Has :meth:`release` dropped this call's tensors?"""
        return self._ids is not None

    def input_ids(self) -> list[int]:
        """``id`` of each input tensor, also after :meth:`release` (identity checks
        against tensors that are still recorded: ids of tensors alive at the same time
        differ, and every recorded tensor was alive when the forward ended)."""
        return self._ids[0] if self._ids is not None else [id(t) for t in self.inputs]

    def output_ids(self) -> list[int]:
        """``id`` of each output tensor, also after :meth:`release`."""
        return self._ids[1] if self._ids is not None else [id(t) for t in self.outputs]

    def release(self, inputs: bool = True) -> None:
        """Drop this call's references to the forward's tensors (its outputs; with
        ``inputs``, its inputs and arguments too), keeping their ids. Reading a released
        tensor afterwards raises :class:`~dlbhooks.errors.RecordReleasedError`."""
        if isinstance(self.inputs if inputs else self.outputs, _Released):
            return  # (done already: an enclosing call's release walks it again)
        if self._ids is None:
            self._ids = (self.input_ids(), self.output_ids())
        gone = _Released(self)
        self.outputs = self.output = self.snapshots = self.output_views = gone
        if inputs:
            self.inputs = self.arguments = self.input_views = gone


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
    # set by an explanation that releases the records behind its walk (start_release):
    # id(view) -> weak ref to its base, id(copy) -> weak ref to the original (the tape's
    # own indexes no longer keep tensors alive; the records do, until released)
    released: bool = False
    _weak_views: dict[int, weakref.ref] = field(default_factory=dict)
    _weak_aliases: dict[int, weakref.ref] = field(default_factory=dict)

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

    def view_base(self, t: Tensor) -> Tensor | None:
        """The recorded tensor that ``t`` (an input no record produced) was noted as a
        view of, if any."""
        hit = self.views.get(id(t))
        if hit is not None:
            return hit[1]
        ref = self._weak_views.get(id(t))
        return None if ref is None else ref()

    def alias_origin(self, t: Tensor) -> Tensor | None:
        """The original of ``t``, if it is a device copy accelerate made."""
        hit = self.aliases.get(id(t))
        if hit is not None:
            return hit[1]
        ref = self._weak_aliases.get(id(t))
        return None if ref is None else ref()

    def start_release(self) -> None:
        """Before a reverse walk that releases each record once it has passed it
        (``tape.explain(release=True)``): the tape's own indexes stop holding tensors (the
        records alone keep them), and the tape cannot be explained again."""
        self.released = True
        self._produced = dict.fromkeys(self._produced)  # type: ignore[assignment]
        self._storages.clear()  # (views are resolved while recording only)
        self._weak_views = {k: weakref.ref(base) for k, (_, base) in self.views.items()}
        self._weak_aliases = {k: weakref.ref(orig) for k, (_, orig) in self.aliases.items()}
        self.views.clear()
        self.aliases.clear()
        self.store.weaken()

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


class _Released:
    """Stands for a released record's tensors (lists and dicts alike): any use raises."""

    __slots__ = ("_rec",)

    def __init__(self, rec: Record):
        self._rec = weakref.ref(rec)  # (a strong one would be a cycle with the record)

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        rec = self._rec()
        where = "a call" if rec is None else rec.describe()
        raise RecordReleasedError(
            f"the recorded tensors of {where} were released once the reverse "
            "walk had passed it (tape.explain(release=True); dlb.explain does this). A rule "
            "may read the records of its own call and of the calls below it only; to explain "
            "the tape again, pass release=False.")

    __getitem__ = __iter__ = __len__ = __contains__ = get = items = values = _fail
    keys = __bool__ = _fail
