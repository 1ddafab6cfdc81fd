"""``dlb.trace(model)``: forward hooks that record every module call; removed on exit."""

from __future__ import annotations

import warnings
import weakref
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .binding import bind_arguments, tensor_leaves
from .errors import OutOfMemoryError, TraceError, is_out_of_memory, memory_advice
from .footprint import record_bytes
from .function_calls import FunctionRecorder
from .integrations.accelerate import hf_hook
from .records import Record, Tape
from .rules import registry
from .rules.functions import INDEX_COPIES, INDEX_READERS, FunctionCall
from .storage import Storage, Store, version_of
from .weights import weight_marks

#: Traces whose block is running (innermost last): functions that are not modules (the
#: attention function) record themselves through these.
ACTIVE: list[trace] = []

#: Setting switches: ``fn(model) -> undo | None`` called on entering a trace (e.g. select
#: dlbhooks' attention implementation and ``use_cache=False`` on transformers models);
#: each returned ``undo()`` runs on exit, in reverse order.
SWITCHES: list = []


class trace:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Record the calls of ``model`` and its submodules while the user's forward runs.

    ``with dlb.trace(model) as tape: out = model(x)`` then ``tape.explain(...)``. Inside
    the block gradients are off unless ``grad=True``. On exit every hook is removed and
    the grad mode restored, even if the forward raised; the model is never modified.

    A model compiled with ``torch.compile`` runs eagerly inside the block (its compiled
    code would skip the hooks; ``torch.compiler.set_stance("force_eager")``, restored on
    exit), and the block leaves an enclosing ``torch.inference_mode()`` for its duration.
    A forward run under ``torch.inference_mode()`` *inside* the block is an error: its
    tensors carry no record of in-place changes.

    ``storage`` chooses where records keep tensors (:class:`~dlbhooks.storage.Storage`):
    ``None`` (by reference, on the computing device), ``"cpu"`` (copies in CPU memory),
    ``"bf16"``/``"fp16"``/``"fp32"`` (cast copies), or ``"cpu+bf16"``. The reverse pass
    always computes on the original device and dtype.

    ``rules`` gives rules for this trace only, without registering them:
    ``{nn.Linear: my_rule, "pkg.module.Block": block_rule}`` — keys are module classes or
    dotted class names, values functions like those :func:`dlbhooks.register_rule` takes
    or :class:`~dlbhooks.rules.registry.Rule` objects (``streamwise``, ``snapshot``).
    They count together with the global registry: the most specific class in a module's
    MRO wins, this trace's rule first at equal specificity. Every rule lookup for this
    tape (its explanations, the snapshots taken while recording, a composite rule's
    ``ctx.lookup(type)``) sees them; the global registry is left as it is.

    ``functions`` (default on): also record the torch functions that modules without a
    rule call in their ``forward`` (``a + b``, ``torch.cat``, ``F.interpolate``; METHOD
    §7), so that their functional code is explained too. A module with a rule runs
    exactly as untraced. ``functions=False`` records module calls only.
    """

    def __init__(
        self, model: nn.Module, *, grad: bool = False,
        storage: Storage | str | torch.dtype | None = None,
        rules: Mapping[type | str, registry.RuleFn | registry.Rule] | None = None,
        functions: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"dlb.trace expects an nn.Module, got {type(model).__name__}")
        self.rules = registry.RuleOverlay.of(rules)
        # torch.compile(model) wraps the model: record (and name paths) from the original
        self.model = model._orig_mod if _wrapped(model) else model
        self.compiled = any(_wrapped(m) or m.__dict__.get("_compiled_call_impl") is not None
                            for m in model.modules())
        self._modes: list[Any] = []
        self.grad = grad
        self.storage = Storage.parse(storage)
        self.tape: Tape | None = None
        self._handles: list[Any] = []
        self._stack: list[Record] = []
        self._calls: dict[int, int] = defaultdict(int)
        self._paths: dict[int, str] = {}
        self._snap: set[int] = set()
        self._grad_before = True
        self._restore: list = []
        # functions called in a forward: recorded for modules without a rule
        self._recorder: FunctionRecorder | None = None
        self.functions = functions
        self._recording: list[bool] = []  # was the recorder active, per open call
        self._no_rule: dict[type, bool] = {}
        self._fn_calls: dict[tuple[int, str], int] = defaultdict(int)

    # -- context manager ------------------------------------------------------------------
    def __enter__(self) -> Tape:
        if self.compiled and not hasattr(torch.compiler, "set_stance"):
            raise TraceError(
                "the model is compiled (torch.compile) and this torch has no "
                "torch.compiler.set_stance to run it eagerly: compiled code skips the hooks "
                "dlbhooks records with. Trace the uncompiled model (model._orig_mod), or "
                "upgrade torch to >= 2.6."
            )
        self.tape = Tape(self.model, store=Store(self.storage), rules=self.rules)
        self._restore = []
        modules = list(self.model.named_modules())  # each module once, first path
        self._paths = {id(m): path for path, m in modules}
        self._snap = _snapshot_targets((m for _, m in modules), self.rules)
        self._grad_before = torch.is_grad_enabled()
        try:
            for _, m in modules:
                self._handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
                self._handles.append(m.register_forward_hook(self._post, with_kwargs=True))
        except BaseException:
            self._remove()
            raise
        try:
            for switch in SWITCHES:
                undo = switch(self.model)
                if undo is not None:
                    self._restore.append(undo)
        except BaseException:
            self._undo()
            raise
        self._enter_modes()
        _warn_if_training(self.model)
        torch.set_grad_enabled(self.grad)
        ACTIVE.append(self)
        return self.tape

    def _enter_modes(self) -> None:
        """Leave an enclosing inference mode (records need version counters) and run
        compiled code eagerly (so that hooks fire), until the block ends."""
        modes: list[Any] = [torch.inference_mode(False)]
        if self.compiled:
            modes.append(torch.compiler.set_stance("force_eager"))
        self._recorder = FunctionRecorder(self) if self.functions else None
        self._recording = []
        for mode in modes:
            mode.__enter__()
            self._modes.append(mode)

    def _exit_modes(self) -> None:
        if self._recorder is not None and self._recorder.on_stack():
            self._recorder.remove()
        self._recording.clear()
        while self._modes:
            self._modes.pop().__exit__(None, None, None)
        self._recorder = None

    def _set_recording(self, on: bool) -> None:
        """Record torch functions (our TorchFunctionMode on the stack) during the forward
        that starts now, or not; :meth:`_restore_recording` when it ends. The mode is
        active only in the forwards of modules without a rule: a module with a rule runs
        exactly as untraced (an active mode would turn off fast paths such as
        ``nn.MultiheadAttention``'s)."""
        recorder = self._recorder
        active = recorder is not None and recorder.on_stack()
        self._recording.append(active)
        if recorder is not None and on != active:
            recorder.push() if on else recorder.remove()

    def _restore_recording(self) -> None:
        was = self._recording.pop()
        recorder = self._recorder
        if recorder is not None and was != recorder.on_stack():
            recorder.push() if was else recorder.remove()

    # -- function calls ---------------------------------------------------------------------
    def function_parent(self) -> Record | None:
        """The module call whose ``forward`` is running, if its function calls are recorded
        (it has no rule: it is walked, not explained by a rule)."""
        if not self._stack:
            return None
        rec = self._stack[-1]
        return rec if self._walked(type(rec.module)) else None

    def _walked(self, kind: type) -> bool:
        """Are calls of ``kind`` walked (no rule, or a rule reached through a parent class
        that may not fit: checked when explaining), rather than explained by a rule?"""
        walked = self._no_rule.get(kind)
        if walked is None:
            rule = registry.lookup(kind, self.rules)
            walked = self._no_rule[kind] = kind is not FunctionCall and (
                rule is None or (rule.check is not None and registry.inherited(kind, self.rules)))
        return walked

    def record_function(self, parent: Record, func: Any, name: str, args: tuple, kwargs: dict,
                        output: Any, before: torch.Tensor | None, where: str) -> Record:
        """Record one torch function call made in ``parent``'s forward (see
        :mod:`dlbhooks.function_calls`); ``before``: the value an in-place call overwrote."""
        tape = self.tape
        call = FunctionCall(func, name, args, kwargs, where)
        path = f"{parent.path}.{name}" if parent.path else name
        rec = self._open(call, {"args": args, "kwargs": kwargs}, path)
        self._calls.pop(id(call), None)
        rec.call = self._fn_calls[(parent.index, name)]
        self._fn_calls[(parent.index, name)] += 1
        call.args, call.kwargs = rec.arguments["args"], rec.arguments["kwargs"]
        ids = func in INDEX_READERS or func in INDEX_COPIES  # token ids carry relevance
        call.derived = frozenset(
            i for i, t in enumerate(rec.inputs)
            if (t.is_floating_point() or ids) and tape.is_derived(t))
        if before is not None:
            call.before = {0: tape.store.keep(before)}
            rec.arguments["before"] = call.before
        self._stack.pop()
        self._close(rec, output)
        return rec

    def __exit__(self, exc_type, exc, tb) -> None:
        if self in ACTIVE:
            ACTIVE.remove(self)
        self._undo()
        self._exit_modes()
        torch.set_grad_enabled(self._grad_before)
        self.tape.weight_marks = weight_marks(self.model)
        inside = self._stack[-1].describe() if self._stack else None
        self._stack.clear()
        if exc is not None and is_out_of_memory(exc):
            where = f"while recording {inside}" if inside else "in the traced block"
            raise OutOfMemoryError(
                memory_advice(where, str(self.storage), record_bytes(self.tape))
            ) from exc
        return None

    def _undo(self) -> None:
        self._remove()
        while self._restore:
            self._restore.pop()()

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- hooks ----------------------------------------------------------------------------
    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        with self._paused():
            self._pre_hook(module, args, kwargs)
        self._set_recording(self.function_parent() is not None)

    def _paused(self) -> _Pause:
        return _Pause(self._recorder)

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_inference_mode_enabled():
            raise TraceError(
                f"the forward of {type(module).__name__} runs under torch.inference_mode() "
                "inside the dlb.trace block: inference tensors carry no version counter, so "
                "in-place changes to recorded tensors could not be detected. Remove the "
                "inference_mode block (dlb.trace already turns gradients off), or put it "
                "around the whole `with dlb.trace(...)` block."
            )
        self._open(module, bind_arguments(module, args, kwargs), self._paths.get(id(module), ""))

    def _open(self, module: nn.Module, arguments: dict, path: str) -> Record:
        tape = self.tape
        arguments = tape.store.keep_all(arguments)
        parent = self._stack[-1] if self._stack else None
        leaves = list(tensor_leaves(arguments))
        if parent is None:
            for _, t in leaves:
                tape.produce(t)
                tape.derive(t)
        rec = Record(
            index=len(tape.records),
            path=path,
            module=module,
            call=self._calls[id(module)],
            parent_ref=None if parent is None else weakref.ref(parent),
            arguments=arguments,
            input_names=[n for n, _ in leaves],
            inputs=[t for _, t in leaves],
            in_versions=[version_of(t) for _, t in leaves],
        )
        self._calls[id(module)] += 1
        moved_by = parent is not None and _has_hf_hook(parent.module)
        for i, t in enumerate(rec.inputs):
            base = tape.resolve(t)
            if base is not None:
                rec.input_views[i] = base
            elif moved_by and not tape.is_produced(t):
                # accelerate's hook on the parent moved its inputs (to the parent's device)
                # inside its forward: the children see copies of the parent's inputs
                tape.alias(t, parent.inputs)
            tape.consumers.setdefault(id(t), []).append(rec)
        tape.records.append(rec)
        if parent is None:
            tape.roots.append(rec)
        else:
            parent.children.append(rec)
        self._stack.append(rec)
        return rec

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._stack or self._stack[-1].module is not module:
            return  # a call that started before tracing began; ignore it
        with self._paused():
            self._close(self._stack.pop(), output)
        self._restore_recording()

    def _close(self, rec: Record, output: Any) -> None:
        tape = self.tape
        module = rec.module
        output = tape.store.keep_all(output)
        leaves = list(tensor_leaves(output))
        rec.output = output
        rec.output_names = [n for n, _ in leaves]
        rec.outputs = [t for _, t in leaves]
        rec.out_versions = [version_of(t) for t in rec.outputs]
        moved = rec.children and _has_hf_hook(module)
        # a call with a rule that read nothing derived from the forward's inputs makes
        # constants; a walked call's outputs are what its insides made them (a rotary
        # table computed from positions is a constant, though the call also read x)
        walked = self.functions and self._walked(type(module))
        derived = rec.parent is None or (
            not walked and any(tape.is_derived(t) for t in rec.inputs))
        for i, t in enumerate(rec.outputs):
            if walked and tape.is_derived(t):  # (made by its insides, or a view of it)
                derived_here = True
            else:
                derived_here = derived
            base = tape.resolve(t)
            if base is not None:
                rec.output_views[i] = base
            elif moved and not tape.is_produced(t):
                # accelerate's hook moved the outputs back (io_same_device): copies of the
                # outputs of the calls inside, last first
                tape.alias(t, [o for c in reversed(rec.children) for o in c.outputs])
            tape.produce(t)
            if derived_here:
                tape.derive(t)
            if not rec.children:
                tape.producers.setdefault(id(t), []).append((rec, i))
        if id(module) in self._snap and not tape.store.active:  # copies are snapshots
            rec.snapshots = {i: t.clone() for i, t in enumerate(rec.outputs)}
        rec.done = True

    # -- calls that are not module calls ---------------------------------------------------
    def record_call(
        self, caller: nn.Module, stand_in: nn.Module, name: str, inputs: dict, output: Any,
        extras: dict | None = None,
    ) -> Record | None:
        """Record a function call made inside ``caller``'s forward (e.g. the attention
        function) as a child record of ``caller``'s current call. ``stand_in`` is a module
        object whose type selects the rule; ``extras`` are kept as non-tensor arguments."""
        if not self._stack or self._stack[-1].module is not caller:
            return None
        parent_path = self._stack[-1].path
        with self._paused():
            rec = self._open(stand_in, dict(inputs),
                             f"{parent_path}.{name}" if parent_path else name)
            rec.arguments.update(self.tape.store.keep_all(extras or {}))
            self._stack.pop()
            self._close(rec, output)
        return rec


class _Pause:
    """Pauses function recording while the tracer's own code runs (its clones, checks)."""

    def __init__(self, recorder: FunctionRecorder | None):
        self.recorder = recorder

    def __enter__(self) -> None:
        if self.recorder is not None:
            self.recorder.paused += 1

    def __exit__(self, *exc: object) -> None:
        if self.recorder is not None:
            self.recorder.paused -= 1


def _warn_if_training(model: nn.Module) -> None:
    """A model in training mode with active dropout records one random sample of it."""
    active = [type(m).__name__ for m in model.modules()
              if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if active:
        warnings.warn(
            f"{type(model).__name__} is in training mode with {len(active)} active dropout "
            f"module(s) ({active[0]}, ...): the recorded forward drops random units, and the "
            "explanation describes that one random sample. Call model.eval() first.",
            stacklevel=3)


def _wrapped(model: nn.Module) -> bool:
    """Is ``model`` the wrapper ``torch.compile(module)`` returns?"""
    return type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod")


def _has_hf_hook(module: nn.Module) -> bool:
    """Does accelerate's hook (``add_hook_to_module``) wrap this module's forward?"""
    return hf_hook(module) is not None


def _snapshot_targets(modules, overlay: registry.RuleOverlay | None = None) -> set[int]:
    """Modules whose outputs a composite rule asked to be cloned at call time."""
    targets: set[int] = set()
    for m in modules:
        rule = registry.lookup(type(m), overlay)
        for name in rule.snapshot if rule is not None else ():
            try:
                targets.add(id(m.get_submodule(name)))
            except AttributeError:
                continue
    return targets
