"""Recording the torch functions a ``forward`` calls (METHOD.md §7), next to module calls.

:class:`FunctionRecorder` is a ``TorchFunctionMode`` active only inside a ``dlb.trace``
block. It records a function call as a child record of the module whose ``forward`` made
it (its module is a :class:`~dlbhooks.rules.functions.FunctionCall`), when

* that module has no rule (a module with a rule is a leaf: its rule covers what it does),
* the call reads a tensor derived from the forward's inputs (produced by a record, or a
  view of one) and returns a new floating-point tensor.

Calls that return their input or a view of it, device moves and calls on constants are not
recorded: views are mapped back exactly by the engine, device copies are aliases, and
constants carry no relevance. An in-place call (``x += y``) keeps the value it overwrote.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .binding import tensor_leaves
from .rules.functions import INDEX_COPIES, INDEX_READERS

if TYPE_CHECKING:
    from .records import Record
    from .trace import trace

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep  # (not torchvision's directory)
_OWN_DIR = os.path.dirname(__file__) + os.sep

#: functions that only move a tensor between devices or read its metadata
_DEVICE_MOVES = {"to", "cuda", "cpu", "pin_memory"}
#: functions that make new tensors from another's shape and dtype only: constants
_CONSTRUCTORS = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor", "zeros_like",
                 "ones_like", "full_like", "empty_like", "rand_like", "randn_like",
                 "randint_like"}



class FunctionRecorder(TorchFunctionMode):
    """Records function calls for ``tracer`` (see the module docstring)."""

    def __init__(self, tracer: trace):
        super().__init__()
        self.tracer = tracer
        self.paused = 0  # > 0 while the tracer's own hooks run

    # -- on the torch function stack, only in the forwards of modules without a rule -----
    def push(self) -> None:
        self.__enter__()

    def remove(self) -> None:
        """Take this mode off torch's function-mode stack, wherever it is (another trace's
        recorder, or a mode of the user's, may sit above it); the others keep their order.
        (The one place that uses torch's mode-stack functions.)"""
        above = []
        while torch._C._len_torch_function_stack():
            mode = torch._C._pop_torch_function_stack()
            if mode is self:
                break
            above.append(mode)
        for mode in reversed(above):
            torch._C._push_on_torch_function_stack(mode)

    def on_stack(self) -> bool:
        n = torch._C._len_torch_function_stack()
        return any(torch._C._get_function_stack_at(i) is self for i in range(n))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        parent = self.tracer.function_parent() if not self.paused else None
        if parent is None:
            return func(*args, **kwargs)
        name = _name(func)
        inplace = _inplace(name)
        target = args[0] if inplace and args and isinstance(args[0], Tensor) else None
        before = None
        if target is not None and target.is_floating_point() and any(
                self.tracer.tape.is_derived(t) for _, t in tensor_leaves((args, kwargs))):
            before = target.clone()  # (only when the call may be recorded)
        out = func(*args, **kwargs)
        try:
            self.paused += 1
            self._maybe_record(parent, func, name, args, kwargs, out, before)
        finally:
            self.paused -= 1
        return out

    def _maybe_record(self, parent: Record, func: Any, name: str, args: tuple, kwargs: dict,
                      out: Any, before: Tensor | None) -> None:
        ids = func in INDEX_READERS or func in INDEX_COPIES  # token ids count
        outs = [t for _, t in tensor_leaves(out) if t.is_floating_point() or func in INDEX_COPIES]
        if not outs:
            return
        tape = self.tracer.tape
        inputs = [t for _, t in tensor_leaves((args, kwargs))]
        # token ids count only for lookups (a mask turned into floats is a constant)
        derived = [t for t in inputs if tape.is_derived(t) and (t.is_floating_point() or ids)]
        if not derived or name in _CONSTRUCTORS:
            return  # a constant computation
        if before is None:
            if any(o is t for o in outs for t in inputs):
                return  # returns an input (eval-mode dropout, `.to` of the same dtype)
            if all(_shares_storage(o, derived) for o in outs):
                return  # a view: mapped back by the engine
            if name in _DEVICE_MOVES and all(o.dtype == derived[0].dtype for o in outs):
                return  # a device copy: an alias
        self.tracer.record_function(parent, func, name, args, kwargs, out, before,
                                    _caller())


def _name(func: Any) -> str:
    """``add`` for ``__add__``, ``add_`` for ``add_`` (the in-place mark stays)."""
    name = getattr(func, "__name__", None) or type(func).__name__
    if name.startswith("__") and name.endswith("__") and len(name) > 4:
        return name[2:-2]
    return name


def _inplace(name: str) -> bool:
    return name.endswith("_") or name in ("iadd", "isub", "imul", "itruediv")


def _shares_storage(t: Tensor, others: list[Tensor]) -> bool:
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return False
    if not ptr:
        return False
    for o in others:
        try:
            if o.untyped_storage().data_ptr() == ptr:
                return True
        except (RuntimeError, NotImplementedError):
            continue
    return False


def _caller() -> str:
    """``file:line`` of the innermost frame outside torch and dlbhooks (the model's code)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not (path.startswith(_TORCH_DIR) or path.startswith(_OWN_DIR)):
            return f"{path}:{frame.f_lineno}"
        frame = frame.f_back
    return "<unknown>"

