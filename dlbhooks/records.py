"""What one module call stored (:class:`Record`) and the tape of a traced forward.

Records keep inputs and outputs by reference (no copies). A record also keeps the
``_version`` of each tensor when it was seen, so a rule that reads values can tell if the
model later changed them in place (``out += identity``), and the clones ("snapshots") a
composite rule asked for before such a change. Weights are read through :func:`fetch_param`
only, so that offloading integrations have one place to hook into.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import RecordModifiedError
from .storage import Storage, Store, version_of


def tensor_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, tensor)`` for every tensor inside nested tuples, lists and dicts."""
    if isinstance(obj, Tensor):
        yield prefix, obj
    elif isinstance(obj, (tuple, list)):
        for i, item in enumerate(obj):
            yield from tensor_leaves(item, f"{prefix}.{i}" if prefix else str(i))
    elif isinstance(obj, dict) or hasattr(obj, "items"):
        try:
            items = list(obj.items())
        except Exception:  # noqa: BLE001 - not a mapping after all
            return
        for key, item in items:
            yield from tensor_leaves(item, f"{prefix}.{key}" if prefix else str(key))


_SIGNATURES: dict[Any, inspect.Signature] = {}


def _signature(module: nn.Module) -> inspect.Signature:
    fwd = module.forward
    key = getattr(fwd, "__func__", fwd)
    sig = _SIGNATURES.get(key)
    if sig is None:
        sig = _SIGNATURES[key] = inspect.signature(fwd)
    return sig


_PLAIN: dict[Any, tuple[str, ...] | None] = {}


def _plain_names(module: nn.Module) -> tuple[str, ...] | None:
    """Parameter names of ``forward`` when they are all plain (positional-or-keyword), so
    a call binds by position without ``inspect``; ``None`` otherwise."""
    fwd = module.forward
    key = getattr(fwd, "__func__", fwd)
    if key not in _PLAIN:
        try:
            params = _signature(module).parameters.values()
        except (TypeError, ValueError):
            _PLAIN[key] = None
        else:
            plain = all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params)
            _PLAIN[key] = tuple(p.name for p in params) if plain else None
    return _PLAIN[key]


def bind_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Name the positional and keyword arguments of a call by ``module.forward``'s signature."""
    names = _plain_names(module)
    if names is not None and len(args) <= len(names):
        out = dict(zip(names, args))
        if not kwargs:
            return out
        if all(k in names and k not in out for k in kwargs):
            out.update(kwargs)
            return {n: out[n] for n in names if n in out}  # in signature order
    try:
        sig = _signature(module)
        bound = sig.bind_partial(*args, **kwargs)
        out = dict(bound.arguments)
        # flatten **kwargs / *args so names stay simple
        for name, param in sig.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in out:
                out.update(out.pop(name))
            elif param.kind is inspect.Parameter.VAR_POSITIONAL and name in out:
                for i, value in enumerate(out.pop(name)):
                    out[f"{name}.{i}"] = value
        return out
    except (TypeError, ValueError):
        named = {f"arg{i}": a for i, a in enumerate(args)}
        named.update(kwargs)
        return named


def fetch_param(module: nn.Module, name: str) -> Tensor | None:
    """The single place rules read a parameter or buffer (``None`` if the module has none).

    A weight on the meta device (offloaded by accelerate) is loaded for the caller only,
    through :func:`dlbhooks.integrations.accelerate.materialise`; the module keeps it
    offloaded.
    """
    value = getattr(module, name, None)
    if value is None:
        return None
    if not isinstance(value, Tensor):
        return value
    if value.device.type == "meta":  # offloaded by accelerate: load it for this rule only
        from .integrations.accelerate import materialise

        return materialise(module, name)
    return value.detach()


class _AbsWeights:
    """``|W|`` of parameters, kept across explanations within a byte budget.

    Explaining many inputs with one model recomputes ``|W|`` for every weighted-sum layer
    each time (an element-wise pass over every weight). Entries are keyed by the
    parameter object (weakly: they go with it), checked against its ``_version`` and data
    pointer (an in-place update or a new ``.data`` recomputes), and taken first come,
    first served until ``budget`` bytes are used; offloaded (meta) weights are never kept.
    """

    def __init__(self, budget: int = 256 * 2**20):
        self.budget = budget
        # id(parameter) -> (weak ref to it, its _version, its data pointer, |W|)
        self._entries: dict[int, tuple[weakref.ref, int, int, Tensor]] = {}

    @property
    def used(self) -> int:
        return sum(v[3].nbytes for v in self._entries.values())

    def get(self, param: Tensor) -> Tensor:
        hit = self._entries.get(id(param))
        if hit is not None and hit[0]() is param and hit[1] == version_of(param) \
                and hit[2] == param.data_ptr():
            return hit[3]
        value = param.detach().abs()
        self._entries.pop(id(param), None)
        # entries of parameters that are gone make room first
        for key in [k for k, v in self._entries.items() if v[0]() is None]:
            del self._entries[key]
        if self.used + value.nbytes <= self.budget:
            self._entries[id(param)] = (weakref.ref(param), version_of(param), param.data_ptr(),
                                        value)
        return value

    def clear(self) -> None:
        self._entries.clear()


ABS_WEIGHTS = _AbsWeights()

# id(tensor) -> (weak ref to it, its _version, all entries > 0): a cached |b| is checked once
_POSITIVE: dict[int, tuple[weakref.ref, int, bool]] = {}


def all_positive(t: Tensor) -> bool:
    """Are all entries of ``t`` > 0? Remembered for the tensor object (until it changes in
    place or is freed), so a cached ``|bias|`` is checked once, not once per explanation."""
    hit = _POSITIVE.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == version_of(t):
        return hit[2]
    value = t.numel() > 0 and float(t.detach().amin()) > 0
    key = id(t)
    _POSITIVE[key] = (weakref.ref(t, lambda _ref, key=key: _POSITIVE.pop(key, None)),
                      version_of(t), value)
    return value


def set_weight_cache(max_bytes: int) -> None:
    """Bytes dlbhooks may keep of ``|W|`` across explanations (default 256 MiB; 0 turns
    the cache off and empties it)."""
    if max_bytes < 0:
        raise ValueError("max_bytes must be >= 0")
    ABS_WEIGHTS.budget = int(max_bytes)
    if max_bytes == 0:
        ABS_WEIGHTS.clear()


def fetch_abs_param(module: nn.Module, name: str) -> Tensor | None:
    """``|module.<name>|``, through :func:`fetch_param`, cached across explanations for
    weights in memory (see :func:`set_weight_cache`)."""
    value = getattr(module, name, None)
    if not isinstance(value, Tensor) or value.device.type == "meta" or not ABS_WEIGHTS.budget:
        fetched = fetch_param(module, name)
        return None if fetched is None else fetched.abs()
    return ABS_WEIGHTS.get(value)


@dataclass(eq=False, repr=False)
class Record:
    """One call of one module: what went in, what came out, and what ran inside it."""

    index: int
    path: str
    module: nn.Module
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
        return type(self.module).__name__

    def describe(self) -> str:
        return f"'{self.path or '<root>'}' ({type(self.module).__module__}.{self.type_name})"

    def child(self, name: str, call: int = 0) -> Record | None:
        """The ``call``-th record of the child (or descendant) at relative path ``name``."""
        full = f"{self.path}.{name}" if self.path else name
        found = [r for r in self.descendants() if r.path == full]
        return found[call] if len(found) > call else None

    def descendants(self) -> Iterator[Record]:
        for c in self.children:
            yield c
            yield from c.descendants()

    def input_value(self, i: int = 0) -> Tensor:
        """Input ``i`` as the module saw it; raises if it was modified in place since."""
        t = self.inputs[i]
        if version_of(t) != self.in_versions[i]:
            raise RecordModifiedError(
                f"input {i} of {self.describe()} was modified in place after the call; "
                "its recorded values are no longer what the module saw. Register a composite "
                "rule for the parent module that snapshots it (snapshot=...)."
            )
        return t

    def output_value(self, i: int = 0) -> Tensor:
        """Output ``i`` as the module returned it (the snapshot if one was taken)."""
        if i in self.snapshots:
            return self.snapshots[i]
        t = self.outputs[i]
        if version_of(t) != self.out_versions[i]:
            raise RecordModifiedError(
                f"output {i} of {self.describe()} was modified in place after the call "
                "(e.g. `out += identity` or an in-place activation) and no snapshot was "
                "taken. Give the parent's composite rule snapshot=('<child name>',)."
            )
        return t

    def output_intact(self, i: int = 0) -> bool:
        return i in self.snapshots or version_of(self.outputs[i]) == self.out_versions[i]


@dataclass(eq=False, repr=False)
class Tape:
    """All records of the forwards run inside one :func:`dlbhooks.trace` block."""

    model: nn.Module
    store: Store = field(default_factory=lambda: Store(Storage()))
    records: list[Record] = field(default_factory=list)
    roots: list[Record] = field(default_factory=list)
    # id(tensor) -> (view tensor, base tensor): inputs that are views of a produced tensor
    views: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # id(tensor) -> records that consumed it (leaf records only are used for saturation)
    consumers: dict[int, list[Record]] = field(default_factory=dict)
    # id(tensor) -> (the last record that returned it, which output): an in-place module
    # (ReLU(inplace=True)) returns its input, so it is the tensor's producer from then on
    producers: dict[int, tuple[Record, int]] = field(default_factory=dict)
    # id(copy) -> (copy, original): tensors accelerate moved between devices inside a
    # module's forward (relevance on the copy belongs to the original, on its device)
    aliases: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # record index -> forward-only quantities rules keep for later explanations
    # (``tape.explain(share=True)``: several targets on one recorded forward)
    shared: dict[int, dict] = field(default_factory=dict)
    _produced: dict[int, Tensor] = field(default_factory=dict)
    _storages: dict[int, list[Tensor]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Tape({type(self.model).__name__}, {len(self.records)} records)"

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
            if _may_be_view_of(t, base):
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

    def last_root(self) -> Record:
        from .errors import TraceError

        if not self.roots:
            raise TraceError(
                "the tape holds no call of the traced model: run the model inside the "
                "`with dlb.trace(model) as tape:` block before calling tape.explain()."
            )
        return self.roots[-1]


def _may_be_view_of(view: Tensor, base: Tensor) -> bool:
    """Cheap test: ``view`` lies inside ``base``'s span of memory (exact test is later)."""
    if view.dtype != base.dtype or view.device != base.device or view.numel() == 0:
        return False

    def span(t: Tensor) -> tuple[int, int]:
        hi = t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
        return t.storage_offset(), hi

    v0, v1 = span(view)
    b0, b1 = span(base)
    return b0 <= v0 and v1 <= b1


def _positions(view: Tensor, base: Tensor, device) -> Tensor | None:
    """For each element of ``view`` (flattened), its flat position in ``base``; ``None`` if
    some element of ``view`` is not an element of ``base``."""
    size = 1 + max(
        t.storage_offset() + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
        for t in (view, base)
    )
    ar = torch.arange(size, device=device)
    base_idx = ar.as_strided(base.shape, base.stride(), base.storage_offset()).reshape(-1)
    view_idx = ar.as_strided(view.shape, view.stride(), view.storage_offset()).reshape(-1)
    where = torch.full((size,), -1, dtype=torch.long, device=device)
    where[base_idx] = torch.arange(base_idx.numel(), device=device)
    pos = where[view_idx]
    return None if bool((pos < 0).any()) else pos


def base_to_view(rel: Tensor, view: Tensor, base: Tensor) -> tuple[Tensor, Tensor] | None:
    """Split relevance on ``base``'s elements into the part at the elements of ``view``
    (shaped like ``view``) and the rest (shaped like ``base``): the inverse of
    :func:`view_to_base` for views whose elements are distinct."""
    pos = _positions(view, base, rel.device)
    if pos is None or pos.unique().numel() != pos.numel():
        return None
    flat = rel.reshape(-1)
    rest = flat.clone()
    rest[pos] = 0
    return flat[pos].view(view.shape), rest.view(base.shape)


def _non_overlapping(t: Tensor) -> bool:
    """Sufficient test that no two elements of ``t`` share memory."""
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    span = 1
    for st, sz in dims:
        if st < span:
            return False
        span = st * sz
    return True


def dense(t: Tensor) -> bool:
    """``t`` owns every position of its span of memory exactly once (contiguous or
    permuted), so positions and elements correspond one to one."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return t.numel() > 0 and span == t.numel() and _non_overlapping(t)


def _strided_to_base(rel: Tensor, view: Tensor, base: Tensor) -> Tensor | None:
    """Fast path of :func:`view_to_base` for a contiguous base and a non-overlapping view
    inside it: one strided copy instead of index tables."""
    if not dense(base) or not _non_overlapping(view):
        return None  # the base must be dense (contiguous or permuted), the view distinct
    off = view.storage_offset() - base.storage_offset()
    last = off + sum((s - 1) * st for s, st in zip(view.shape, view.stride()))
    if off < 0 or last >= base.numel():
        return None
    out = torch.zeros_like(base, dtype=rel.dtype)  # same (dense) strides as the base
    out.as_strided(view.shape, view.stride(), out.storage_offset() + off).copy_(rel)
    return out


def view_to_base(rel: Tensor, view: Tensor, base: Tensor) -> Tensor | None:
    """Move relevance from a view back onto the elements of its base (exact inverse).

    Returns ``None`` if some element of ``view`` is not an element of ``base``.
    """
    fast = _strided_to_base(rel, view, base)
    if fast is not None:
        return fast
    pos = _positions(view, base, rel.device)
    if pos is None:
        return None
    out = rel.new_zeros(base.numel())
    out.index_add_(0, pos, rel.reshape(-1))
    return out.view(base.shape)


def _tape_explain(self: Tape, target: Any = None, **kwargs: Any):
    """Explain the last recorded call of the model; see :func:`dlbhooks.api.explain_tape`."""
    from .api import explain_tape

    return explain_tape(self, target, **kwargs)


Tape.explain = _tape_explain  # type: ignore[attr-defined]
