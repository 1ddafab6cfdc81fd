"""Weight access for rules: :func:`fetch_param`, the one place a parameter is read, and
the ``|W|`` cache kept across explanations (:func:`fetch_abs_param`,
:func:`set_weight_cache`)."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import scratch
from .errors import UnsupportedModuleError
from .integrations.accelerate import materialise
from .storage import version_of

#: ``fn(module, weight) -> float tensor`` per weight type or module type (class or dotted
#: name): how to read the weights of quantized layers (:func:`register_dequantizer`)
DEQUANTIZERS: dict[type | str, Callable[[nn.Module, Tensor], Tensor]] = {}


def register_dequantizer(kind: type | str,
                         fn: Callable[[nn.Module, Tensor], Tensor]) -> None:
    """Read quantized weights of ``kind`` — a weight class (a quantized tensor subclass) or
    a module class, or its dotted name — as ``fn(module, weight)`` (a float tensor shaped
    like the layer's weight). Rules then read them like any weight, per module, in the
    reverse pass."""
    DEQUANTIZERS[kind] = fn


def _dequantizer(module: nn.Module, value: Tensor
                 ) -> Callable[[nn.Module, Tensor], Tensor] | None:
    for cls in (*type(value).__mro__, *type(module).__mro__):
        if cls in (Tensor, nn.Parameter, nn.Module, object):
            continue
        fn = DEQUANTIZERS.get(cls) or DEQUANTIZERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if fn is not None:
            return fn
    return None


def _bnb_4bit(module: nn.Module, W: Tensor) -> Tensor:
    import bitsandbytes.functional as bnbf  # lazy: optional dependency

    return bnbf.dequantize_4bit(W.data, W.quant_state)


def _bnb_8bit(module: nn.Module, W: Tensor) -> Tensor:
    cb = W.CB if getattr(W, "CB", None) is not None else W.data
    return cb.float() * W.SCB.float()[:, None] / 127.0


# bitsandbytes' 4- and 8-bit parameters (by name: bitsandbytes is optional). Written from
# its documented API; the test suite checks the mechanism with a layer of its own.
DEQUANTIZERS["bitsandbytes.nn.modules.Params4bit"] = _bnb_4bit
DEQUANTIZERS["bitsandbytes.nn.modules.Int8Params"] = _bnb_8bit


def plain_float(value: Tensor) -> bool:
    """A float tensor or parameter (not a quantized tensor subclass)."""
    return value.is_floating_point() and type(value) in (Tensor, nn.Parameter)


def dequantized(module: nn.Module, name: str, value: Tensor) -> Tensor:
    """``value`` (a parameter of ``module``) as a float tensor: itself when it is one,
    else through a registered dequantizer or the tensor's own ``dequantize()`` (torchao's
    quantized tensors); a clear error otherwise."""
    if plain_float(value):
        return value
    fn = _dequantizer(module, value)
    if fn is not None:
        return fn(module, value).detach()
    if type(value) not in (Tensor, nn.Parameter) and callable(getattr(value, "dequantize",
                                                                       None)):
        return value.dequantize().detach()
    if value.is_floating_point() or type(value) is Tensor:
        return value  # (a plain integer buffer, e.g. positions: not a quantized weight)
    raise UnsupportedModuleError(
        f"{type(module).__module__}.{type(module).__qualname__}.{name} holds quantized "
        f"weights ({type(value).__name__}, {value.dtype}) that dlbhooks cannot read: "
        "register how to dequantize them with dlb.register_dequantizer(weight or module "
        "class, fn), or load the model unquantized (e.g. in bfloat16 with a device_map).")


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
        return dequantized(module, name, materialise(module, name))
    return value.detach() if plain_float(value) else dequantized(module, name, value)


#: The default ``|W|`` cache budget: small against the records of an explanation, so that
#: the cache stays inside an explanation's memory bound (scripts/bench_llm.py); enough for
#: small models (an MLP or a CNN of a few million weights) to be kept whole.
DEFAULT_WEIGHT_CACHE = 64 * 2**20


class _AbsWeights:
    """``|W|`` of parameters, kept across explanations within a byte budget.

    Explaining many inputs with one model recomputes ``|W|`` for every weighted-sum layer
    each time (an element-wise pass over every weight). Entries are keyed by the
    parameter object (weakly: they go with it), checked against its ``_version`` and data
    pointer (an in-place update or a new ``.data`` recomputes), and taken first come,
    first served until ``budget`` bytes are used; offloaded (meta) weights are never kept.
    """

    def __init__(self, budget: int = DEFAULT_WEIGHT_CACHE):
        self.budget = budget
        # id(parameter) -> (weak ref to it, its _version, its data pointer, |W|)
        self._entries: dict[int, tuple[weakref.ref, int, int, Tensor]] = {}

    @property
    def used(self) -> int:
        return sum(v[3].nbytes for v in self._entries.values())

    def get(self, param: Tensor, transient: bool = False) -> Tensor:
        """``|param|``: the kept copy, or a new one (kept if it fits the budget); with
        ``transient``, one that does not fit is written to a scratch buffer instead
        (:func:`~dlbhooks.scratch.buffer`, valid until the next transient ``|W|``)."""
        hit = self._entries.get(id(param))
        if hit is not None and hit[0]() is param and hit[1] == version_of(param) \
                and hit[2] == param.data_ptr():
            return hit[3]
        self._entries.pop(id(param), None)
        # entries of parameters that are gone make room first
        for key in [k for k, v in self._entries.items() if v[0]() is None]:
            del self._entries[key]
        nbytes = param.numel() * param.element_size()
        if self.used + nbytes <= self.budget:
            value = param.detach().abs()
            self._entries[id(param)] = (weakref.ref(param), version_of(param), param.data_ptr(),
                                        value)
            return value
        if transient:  # fresh memory for a |W| each layer costs ~3x the pass itself
            out = scratch.buffer("abs_weight", tuple(param.shape), param.dtype, param.device)
            return torch.abs(param.detach(), out=out)
        return param.detach().abs()

    def clear(self) -> None:
        self._entries.clear()

    def shrink(self) -> None:
        """Drop entries, last kept first, until what is kept fits the budget."""
        while self._entries and self.used > self.budget:
            self._entries.pop(next(reversed(self._entries)))


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
    """Bytes dlbhooks may keep of ``|W|`` across explanations (default 64 MiB,
    :data:`DEFAULT_WEIGHT_CACHE`; 0 turns the cache off and empties it; a smaller budget
    drops what no longer fits)."""
    if max_bytes < 0:
        raise ValueError("max_bytes must be >= 0")
    ABS_WEIGHTS.budget = int(max_bytes)
    if max_bytes == 0:
        ABS_WEIGHTS.clear()
    ABS_WEIGHTS.shrink()


def fetch_abs_param(module: nn.Module, name: str, transient: bool = False) -> Tensor | None:
    """``|module.<name>|``, through :func:`fetch_param`, cached across explanations for
    weights in memory (see :func:`set_weight_cache`). ``transient``: the caller uses it
    before it asks for another transient ``|W|`` (a rule, within its call), so one that is
    not cached may be written to a reused scratch buffer (inside a reverse pass)."""
    value = getattr(module, name, None)
    if not isinstance(value, Tensor) or value.device.type == "meta":
        fetched = fetch_param(module, name)
        return None if fetched is None else fetched.abs()
    return ABS_WEIGHTS.get(value, transient)


def weight_marks(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (version counter, data pointer)}`` of the model's parameters in memory
    (offloaded ones, on the meta device, are left out): taken when a trace ends, so that an
    explanation can tell if a weight changed since the recorded forward."""
    return {name: (version_of(p), p.data_ptr()) for name, p in model.named_parameters()
            if p.device.type != "meta"}


def changed_weights(model: nn.Module, marks: dict[str, tuple[int, int]]) -> list[str]:
    """Names of parameters updated in place (an optimizer step) or replaced since ``marks``."""
    now = weight_marks(model)
    return [name for name, mark in marks.items() if now.get(name, mark) != mark]
