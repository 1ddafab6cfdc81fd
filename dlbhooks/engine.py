"""The reverse walk: seed -> records in reverse -> rule dispatch -> route relevance.

Relevance is routed between records by tensor identity (a :class:`Bag` keyed by
``id(tensor)``), so any DAG of modules works: a tensor consumed by several modules sums
their relevance, a reused module is one record per call, and an in-place module (its
output *is* its input) is handled because records are processed in reverse call order.
An input that is a view of a recorded tensor (``torch.flatten``, ``x[:, 0]``, ``permute``)
is mapped back onto it exactly. Anything else that no record produced is a functional gap
and raises :class:`~dlbhooks.errors.FunctionalGapError`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .errors import FunctionalGapError, OffloadError, UnsupportedModuleError
from .integrations.accelerate import materialise
from .ledger import LedgerEntry, PendingEntry, finish_ledger, finish_ledgers
from .relevance import Rel, radd, rmap, rsum, stack, streams_of
from .rules import registry
from .rules.contract import Bag as BagLike
from .rules.contract import RuleResult, legacy_call, streamwise_call
from .rules.elementwise import nonnegative_output, saturation_bounds
from .rules.functions import FunctionCall
from .storage import record_tensors, version_of
from .views import base_to_view, stacked_to_base, view_to_base
from .weights import all_positive, fetch_abs_param, fetch_param, plain_float

if TYPE_CHECKING:
    from .records import Record, Tape


#: called with each record the walk reaches, before its rule runs (memory estimates)
RECORD_OBSERVER: ContextVar[Callable[[Record], None] | None] = ContextVar(
    "dlbhooks_record_observer", default=None)


def _forget(sums: dict, key: int, _ref: object = None) -> None:
    """Drop the ledger total of a relevance tensor that was freed (if still its entry;
    the weak reference's callback)."""
    hit = sums.get(key)
    if hit is not None and hit[0]() is None:
        del sums[key]


class Bag:
    """Relevance waiting at tensors, keyed by identity."""

    def __init__(self, tape: Tape, owner: Record | None = None):
        self.tape = tape
        # tensors the owner (the container being walked) received: kept as they are, so
        # that ``collect`` finds them even when they are views of an outer tensor
        self._keep = {id(t) for t in owner.inputs} if owner is not None else set()
        self._rel: dict[int, Rel] = {}
        self._tensor: dict[int, Tensor] = {}
        self._by: dict[int, Record | None] = {}

    def add(
        self, t: Tensor, R: Rel, by: Record | None = None, *, base: Tensor | None = None
    ) -> None:
        """Put relevance ``R`` on tensor ``t``. If ``t`` is a view of the recorded tensor
        ``base`` (as the record noted when it consumed ``t``), the relevance moves onto
        ``base``'s elements. Without ``base``, a view no record produced is looked up."""
        key = id(t)
        original = self.tape.alias_origin(t) if key not in self._keep else None
        if original is not None:
            # a device copy made by accelerate: the relevance belongs to the original
            t = original
            R = R.to(t.device)
            key, base = id(t), None
        if base is None and not self.tape.is_produced(t):
            base = self.tape.view_base(t)
        if base is not None and key not in self._keep:
            moved = stacked_to_base(R, t, base) if isinstance(R, Tensor) else rmap(
                lambda r: view_to_base(r, t, base), R)
            if moved is not None:
                t, R, key = base, moved, id(base)
        self._rel[key] = radd(self._rel.get(key), R)
        self._tensor[key] = t
        self._by.setdefault(key, by)

    def pop(self, t: Tensor) -> Rel | None:
        key = id(t)
        self._tensor.pop(key, None)
        self._by.pop(key, None)
        return self._rel.pop(key, None)

    def peek(self, t: Tensor) -> Rel | None:
        return self._rel.get(id(t))

    def leftovers(self):
        for key, R in self._rel.items():
            yield self._tensor[key], R, self._by[key]


@dataclass
class Reports:
    """What rules report during one explanation, summed over calls (the
    :class:`~dlbhooks.rules.contract.RuleContext` ``report_*`` methods)."""

    # {block key: {path name: per-stream totals}} (MoE routed vs shared, functional paths)
    blocks: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    heads: dict[str, Rel] = field(default_factory=dict)  # relevance per attention head
    experts: dict[str, Rel] = field(default_factory=dict)  # relevance per expert
    routing: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)  # (indices, weights)


@dataclass
class Engine:
    """Runs one explanation over a tape; rules receive it as ``ctx`` (it implements
    :class:`~dlbhooks.rules.contract.RuleContext`)."""

    tape: Tape
    mode: str = "default"
    saturation: bool = True
    keep: bool = True
    share: bool = False
    # drop each record's tensors once the walk has passed it (tape.explain(release=True))
    release: bool = False
    # targets explained in this one pass (the relevance's leading axis is targets × streams)
    targets: int = 1
    # the ledger being built, output->input order; finish() makes the final one
    ledger: list[PendingEntry] = field(default_factory=list)
    kept: dict[str, list[Rel | None]] = field(default_factory=dict)
    # length of the log of absorptions: one item per processed call that absorbed, in
    # order (a pending entry spans the items its call and the calls below it made)
    _absorptions: int = 0
    # id(relevance tensor) -> (weak reference, version, float64 total): a tensor passed
    # from one record to the next is summed once for the ledger. Weak: a relevance the bag
    # combines with another (a tensor read by several records) never comes back as it was
    # and must not be kept alive until the end of the walk
    _sums: dict[int, tuple[weakref.ref[Tensor], int, Tensor]] = field(default_factory=dict)
    reports: Reports = field(default_factory=Reports)
    current: Record | None = None  # the record whose rule runs (for error messages)
    _param_owner: nn.Module | None = None
    _param_cache: dict[str, Tensor | None] = field(default_factory=dict)

    # -- services for rules --------------------------------------------------------------
    @property
    def contrastive(self) -> bool:
        return self.mode == "contrastive"

    @property
    def streams(self) -> int:
        """Streams per target: 1 (default mode) or 2 (contrastive: positive, negative)."""
        return 2 if self.contrastive else 1

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype stored records are computed in (the storage policy's), or ``None``."""
        return self.tape.store.policy.dtype

    def lookup(self, module_type: type) -> registry.Rule | None:
        """The rule for ``module_type`` in this explanation: the tape's own rules
        (``dlb.trace(model, rules=...)``) over the global registry."""
        return registry.lookup(module_type, self.tape.rules)

    def param(self, module: nn.Module, name: str) -> Tensor | None:
        """A module's parameter or buffer, fetched through the one weight-access function.

        The weights of the module asked for last are kept until another module is asked
        for, so a rule reading ``weight`` then ``bias`` of an offloaded module loads it once.
        """
        if self._param_owner is not module:
            self._param_owner, self._param_cache = module, {}
        if name not in self._param_cache:
            try:
                self._param_cache[name] = fetch_param(module, name)
            except OffloadError as err:
                path = next((p for p, m in self.tape.model.named_modules() if m is module), "?")
                parts = path.split(".") if path not in ("", "?") else []
                ancestors = tuple(  # nearest first; a parent's hook may load its children
                    self.tape.model.get_submodule(".".join(parts[:k]))
                    for k in range(len(parts) - 1, -1, -1)
                )
                try:
                    self._param_cache[name] = materialise(module, name, ancestors)
                except OffloadError:
                    raise OffloadError(f"module '{path}': {err}") from None
        return self._param_cache[name]

    def abs_param(self, module: nn.Module, name: str,
                  transient: bool = False) -> Tensor | None:
        """``|weight|``, cached across explanations within a budget
        (:func:`dlbhooks.weights.set_weight_cache`); an offloaded weight is loaded once,
        through :meth:`param`, and its ``|W|`` is not kept. ``transient``: the rule uses it
        before it asks for another transient ``|W|``, so one the cache does not keep may
        live in a scratch buffer (new memory per layer costs more than computing it)."""
        value = getattr(module, name, None)
        if isinstance(value, Tensor) and value.device.type != "meta" and plain_float(value):
            return fetch_abs_param(module, name, transient)
        W = self.param(module, name)
        return None if W is None else W.abs()

    def abs_bias(self, module: nn.Module,
                 name: str = "bias") -> tuple[Tensor | None, bool | None]:
        """``|bias|`` (through :meth:`abs_param`) and whether all of it is > 0 (remembered
        per tensor, so a cached ``|bias|`` is checked once); ``(None, None)`` without one."""
        babs = self.abs_param(module, name)
        return babs, None if babs is None else all_positive(babs)

    def shared(self, rec: Record) -> dict | None:
        """A dict a rule may keep forward-only quantities in (e.g. its denominators) for
        later explanations of the same tape, when sharing is on (``share=True``)."""
        if not self.share or self.tape.store.active:  # stored records change per rule
            return None
        return self.tape.shared.setdefault(rec.index, {})

    def nonnegative_input(self, rec: Record, i: int = 0) -> bool:
        """Is ``rec``'s input ``i`` the unchanged output of a module whose output is never
        negative (a ReLU, a sigmoid; :data:`~dlbhooks.rules.elementwise.NONNEGATIVE`)?
        Then ``|a| = a`` needs no check."""
        key = id(rec.inputs[i])
        for prod, j in reversed(self.tape.producers.get(key, ())):
            if prod.output_ids()[j] == key and prod.out_versions[j] == rec.in_versions[i]:
                return nonnegative_output(prod.module)
        return False

    def bounds_after(self, rec: Record):
        """Saturation bounds of the activation that alone consumed ``rec``'s output."""
        if not self.saturation or self.contrastive or not rec.outputs:
            return None
        key = id(rec.outputs[0])
        users = [  # (by id: a consumer the walk has passed may be released)
            r for r in self.tape.consumers.get(key, [])
            if not r.children and r is not rec
            and any(i == key and v == rec.out_versions[0]
                    for i, v in zip(r.input_ids(), r.in_versions))
        ]
        if len({id(r) for r in users}) != 1:
            return None
        return saturation_bounds(users[0].module)

    def new_bag(self, owner: Record | None = None) -> Bag:
        """A bag for walking ``owner``'s children (pass it: its inputs stay un-moved)."""
        return Bag(self.tape, owner)

    # -- the walk -----------------------------------------------------------------------
    def walk(self, records: list[Record], bag: BagLike) -> BagLike:
        """Process ``records`` from last to first, taking and leaving relevance in ``bag``."""
        for rec in reversed(records):
            self.step(rec, bag)
        return bag

    def step(self, rec: Record, bag: BagLike) -> None:
        """Process one record: take its outputs' relevance from ``bag``, leave its inputs'."""
        R_out = [bag.pop(o) for o in rec.outputs]
        if all(r is None for r in R_out):
            return
        R_in = self.propagate(rec, R_out, consume=True)
        for i, (t, R) in enumerate(zip(rec.inputs, R_in)):
            if R is not None:
                bag.add(t, R, rec, base=rec.input_views.get(i))

    def report_block(self, key: str, name: str, value: Rel) -> None:
        """Add the per-stream total of ``value`` to block ``key``'s path ``name`` (e.g. an
        MoE block's routed and shared parts): ``Explanation.blocks``."""
        entry = self.reports.blocks.setdefault(key, {})
        entry[name] = radd(entry.get(name), rsum(value))

    def report_heads(self, key: str, value: Rel) -> None:
        """Add relevance per attention head (``[S, ..., heads]``) under the attention
        module ``key``: ``Explanation.heads``."""
        _keep(self.reports.heads, key, value)

    def report_experts(self, key: str, value: Rel) -> None:
        """Add relevance per expert (``[S, ..., experts]``) under the MoE block ``key``:
        ``Explanation.experts``."""
        _keep(self.reports.experts, key, value)

    def pop_experts(self, key: str) -> Rel | None:
        """Take back the relevance per expert reported so far under ``key`` (a composite
        that adds columns to what its experts module reported)."""
        return self.reports.experts.pop(key, None)

    def report_routing(self, key: str, indices: Tensor, weights: Tensor) -> None:
        """The MoE block ``key``'s routing: selected experts and their weights per token
        (``Explanation.routing``; a block called twice keeps the last call's)."""
        self.reports.routing[key] = (indices.detach(), weights.detach())

    def seed_outputs(self, rec: Record, R_out: list[Rel | None], *,
                     keep_inputs: bool = True) -> Bag:
        """A bag for walking ``rec``'s children, holding the relevance of its outputs (the
        one way composite rules seed a bag from a record).

        ``keep_inputs``: the bag is ``rec``'s own (:meth:`new_bag` with ``rec``): relevance
        put on ``rec``'s inputs stays on those very tensors, even when they are views of
        outer tensors or device copies, for :meth:`collect` to take. ``False``: a bag
        without an owner (the torchvision CNN composites): relevance reaching an input
        that is a view of an outer tensor moves onto that tensor at once, and
        :meth:`collect` takes the view's elements back from it."""
        bag = self.new_bag(rec if keep_inputs else None)
        for i, (o, R) in enumerate(zip(rec.outputs, R_out)):
            if R is not None:
                bag.add(o, R, None, base=rec.output_views.get(i))
        return bag

    def propagate(self, rec: Record, R_out: list[Rel | None], *,
                  consume: bool = False) -> list[Rel | None]:
        """Relevance on ``rec``'s inputs, given relevance on its outputs. ``consume``: the
        relevance is handed over and ``R_out`` emptied, so that the caller's list does not
        keep it (an LM's seed, as large as its logits) alive through the walk below."""
        observe = RECORD_OBSERVER.get()
        if observe is not None:
            observe(rec)
        filled = self._fill(rec, R_out)
        if consume:
            R_out.clear()
        R_out = filled
        entry = PendingEntry(rec.key, rec.path, rec.type_name, self._absorptions)
        self.ledger.append(entry)  # before its children's entries: output->input order
        # totals stay tensors here (no device sync per call); finish() makes them floats
        entry.relevance_out = self._total(R_out)
        rule = self._rule_for(rec)
        if rule is not None:
            R_in, absorbed = self._apply_loaded(rule, rec, R_out)
        elif rec.children or rec.output_views:  # (a leaf returning a view of its input:
            R_in, absorbed = self._transparent(rec, R_out), None  # a permutation, a reshape)
        else:
            raise UnsupportedModuleError(
                f"no relevance rule for {rec.describe()}. Register one:\n"
                f"    @dlb.register_rule({type(rec.module).__module__}.{rec.type_name})\n"
                "    def rule(record, relevance_out, ctx) -> dlb.RuleResult: ...\n"
                "or check dlb.coverage(model) before tracing."
            )
        if len(R_in) != len(rec.inputs):
            raise UnsupportedModuleError(
                f"the rule for {rec.describe()} returned {len(R_in)} relevances for "
                f"{len(rec.inputs)} tensor inputs"
            )
        if absorbed is not None:
            self._absorptions += 1  # the call's own absorption: the last item of its span
        entry.relevance_in = self._total(R_in)
        entry.absorbed = absorbed
        # (the function calls of a module whose inherited rule fitted are not its children)
        entry.leaf = rule is not None and all(isinstance(c.module, FunctionCall)
                                              for c in rec.children)
        entry.log_end = self._absorptions
        if self.keep:
            self.kept.setdefault(rec.key, R_in)
        if self.release and rule is not None:  # (a rule reads the calls below its own)
            for d in rec.descendants():
                d.release()
        return R_in

    def _rule_for(self, rec: Record) -> registry.Rule | None:
        """The rule of ``rec``'s module; a rule it gets only through a parent class must
        pass its check on the record, else its calls are walked."""
        rule = self.lookup(type(rec.module))
        if rule is None or rule.check is None or not registry.inherited(
                type(rec.module), self.tape.rules):
            return rule
        self.current = rec
        if rule.check(rec):
            return rule
        if rec.children:
            return None
        raise UnsupportedModuleError(
            f"{rec.describe()} inherits the rule {rule.name!r} of a parent class, but its "
            "recorded output is not what that rule computes (e.g. a channel-first "
            f"LayerNorm). Register a rule for {type(rec.module).__module__}."
            f"{rec.type_name} with @dlb.register_rule.")

    def finish(self) -> list[LedgerEntry]:
        """The final ledger (:func:`~dlbhooks.ledger.finish_ledger`): the totals as floats
        (``(pos, neg)`` in contrastive mode), with what each call absorbed inside it."""
        return finish_ledger(self.ledger, self._absorptions, self.contrastive)

    def finish_targets(self) -> list[list[LedgerEntry]]:
        """One final ledger per target (:meth:`finish` of each target's streams)."""
        return finish_ledgers(self.ledger, self._absorptions, self.contrastive, self.targets)

    def note_total(self, t: Tensor, total: Tensor) -> None:
        """The ledger's per-stream total of ``t`` (``[S]`` float64), known to the caller
        (a seed zero outside a few rows): not summed again while ``t`` is unchanged."""
        key = id(t)
        self._sums[key] = (weakref.ref(t, partial(_forget, self._sums, key)), version_of(t),
                           total.to(torch.float64))

    def _total(self, rels: list[Rel | None]) -> Rel | None:
        """Float64 total of a list of relevances, each tensor summed only once: a record's
        input relevance is remembered (weakly, with its version) for when it arrives as
        another record's output relevance, or goes on unchanged as this one's input."""
        sums = self._sums

        def one(t: Tensor) -> Tensor:
            key = id(t)
            hit = sums.get(key)
            version = version_of(t)
            if hit is not None and hit[0]() is t and hit[1] == version:
                return hit[2]
            total = rsum(t)
            assert total is not None
            sums[key] = (weakref.ref(t, partial(_forget, sums, key)), version, total)
            return total

        total = None
        for r in rels:
            if r is not None:
                total = radd(total, one(r))
        return total

    def _apply(self, rule: registry.Rule, rec: Record,
               R_out: list[Rel | None]) -> tuple[list[Rel | None], Tensor | None]:
        self.current = rec
        if rule.streamwise:
            res = streamwise_call(rule.fn, rec, R_out, self)
        elif rule.stacked:
            res = rule.fn(rec, R_out, self)
            if not isinstance(res, RuleResult):
                raise TypeError(
                    f"the rule {rule.name!r} for {rec.describe()} returned "
                    f"{type(res).__name__}; rules annotated `-> RuleResult` must return "
                    "dlbhooks.RuleResult(relevance_in, absorbed)")
        elif self.targets > 1:
            raise UnsupportedModuleError(
                f"the rule {rule.name!r} for {rec.describe()} is written to the first rule "
                "form, which knows one target's streams only: explain the targets one at a "
                "time, or write the rule to the RuleResult form (README, 'Custom rules').")
        else:
            res = legacy_call(rule.fn, rec, R_out, self)
        return list(res.relevance_in), rsum(res.absorbed)

    def _apply_loaded(self, rule: registry.Rule, rec: Record,
                      R_out: list[Rel | None]) -> tuple[list[Rel | None], Tensor | None]:
        """Apply ``rule`` with ``rec``'s stored tensors back on their device and dtype."""
        store = self.tape.store
        if not store.active:
            return self._apply(rule, rec, R_out)
        with store.loaded(record_tensors(rec)):
            return self._apply(rule, rec, R_out)

    def _transparent(self, rec: Record, R_out: list[Rel]) -> list[Rel | None]:
        """A container with no rule: walk its children, routing by tensor identity (the
        relevance goes into the bag: ``R_out`` is emptied)."""
        bag = self.seed_outputs(rec, R_out)
        R_out.clear()
        if not self.release:
            self.walk(rec.children, bag)
            return self.collect(rec, bag)
        if rec.parent is None:  # the model's outputs (the logits) are in the bag now
            rec.release(inputs=False)
        for child in reversed(rec.children):  # no rule here reads a child once walked
            self.step(child, bag)
            child.release()
            for d in child.descendants():
                d.release()
        return self.collect(rec, bag)

    def collect(self, rec: Record, bag: BagLike) -> list[Rel | None]:
        """Take the relevance of ``rec``'s inputs out of ``bag``; anything left is a gap."""
        R_in = [bag.pop(t) for t in rec.inputs]
        for i, base in rec.input_views.items():
            # an input that is a view of an outer tensor, whose relevance a bag without
            # an owner moved onto that tensor: take back the view's elements
            moved = bag.peek(base)
            if moved is None:
                continue
            parts = [base_to_view(r, rec.inputs[i], base) for r in streams_of(moved)]
            if any(p is None for p in parts):
                continue
            bag.pop(base)
            R_in[i] = radd(R_in[i], stack([p[0] for p in parts]))
            rest_rel = stack([p[1] for p in parts])
            if bool(_rtotal_abs(rest_rel) > 0):
                bag.add(base, rest_rel, None)
        for t, R, by in bag.leftovers():
            if not bool(_rtotal_abs(R) > 0):
                continue
            raise FunctionalGapError(_gap_message(rec, t, by))
        return R_in

    def _fill(self, rec: Record, R_out: list[Rel | None]) -> list[Rel | None]:
        # relevance lives on the device of the record it belongs to (models split over
        # devices by a device map): move what arrives from a record on another device
        device_of = self.tape.store.device_of
        R_out = [
            R if R is None or R.device == (d := device_of(o)) else R.to(d)
            for o, R in zip(rec.outputs, R_out)
        ]
        like = next((r for r in R_out if r is not None), None)
        if like is None:
            return R_out
        S = like.shape[0]
        return [
            (torch.zeros((S, *o.shape), dtype=like.dtype, device=device_of(o))
             if R is None and o.is_floating_point() else R)
            for o, R in zip(rec.outputs, R_out)
        ]


def _keep(reports: dict[str, Rel], key: str, value: Rel) -> None:
    reports[key] = radd(reports.get(key), value.detach())


def _rtotal_abs(R: Rel) -> Tensor:
    return R.abs().sum()


def _gap_message(container: Record, t: Tensor, consumer: Record | None) -> str:
    where = container.describe()
    shape = tuple(t.shape) if hasattr(t, "shape") else repr(t)
    if consumer is None:
        return (
            f"relevance reached the output of {where} (shape {shape}), but no "
            f"recorded submodule produced it: {container.type_name}.forward computes it with "
            "functional code hooks cannot see. Register a composite rule for "
            f"{type(container.module).__module__}.{container.type_name} with "
            "@dlb.register_rule (see README, 'Custom rules')."
        )
    siblings = [r for r in container.children if r.index < consumer.index]
    before = siblings[-1].describe() if siblings else "the start of the forward"
    return (
        f"relevance reached a tensor of shape {shape} consumed by "
        f"{consumer.describe()}, but no recorded module produced it: it was computed by "
        f"functional code in {where}.forward between {before} and {consumer.describe()}. "
        f"Register a composite rule for {type(container.module).__module__}."
        f"{container.type_name} with @dlb.register_rule (see README, 'Custom rules')."
    )
