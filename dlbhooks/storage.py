"""Where records keep their tensors: the storage policy of :func:`dlbhooks.trace`.

By default a record keeps the tensors a module saw and returned by reference, on the
device that computed them. ``dlb.trace(model, storage=...)`` can instead keep a copy in
CPU memory, cast to a smaller float type, or both (:class:`Storage`), so that long inputs
and big models fit: the device only holds what the forward itself needs.

The copies keep the routing of relevance intact: a tensor passed from one module to the
next is copied once (the same copy goes into both records, found through a weak
reference to the original), a tensor modified in place is copied again, and a view of a
copied tensor is stored as the same view of the copy. During the reverse pass each
record's tensors are brought back, as the *same Python objects*, to the device and dtype
that computed them, only while the rule for that record runs (:meth:`Store.loaded`), so
rules always compute in the model's own precision on the model's own device.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .binding import tensor_leaves
from .views import dense

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
           "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
           "float32": torch.float32}


@dataclass(frozen=True)
class Storage:
    """Where records keep tensors: ``device`` (``None``: where they were computed) and
    ``dtype`` for floating-point tensors (``None``: as computed)."""

    device: torch.device | None = None
    dtype: torch.dtype | None = None

    @property
    def default(self) -> bool:
        return self.device is None and self.dtype is None

    def __str__(self) -> str:
        parts = [str(self.device) if self.device is not None else "",
                 str(self.dtype).replace("torch.", "") if self.dtype is not None else ""]
        return "+".join(p for p in parts if p) or "device"

    @classmethod
    def parse(cls, spec: Storage | str | torch.dtype | None) -> Storage:
        """``None``/``"device"``: by reference (default); ``"cpu"``: copies in CPU memory;
        ``"bf16"``/``"fp16"``/``"fp32"`` or a dtype: cast copies on the device;
        ``"cpu+bf16"``: both; or a :class:`Storage`."""
        if spec is None or isinstance(spec, Storage):
            return spec or cls()
        if isinstance(spec, torch.dtype):
            return cls(dtype=_float_dtype(spec))
        if not isinstance(spec, str):
            raise TypeError(f"storage must be a string, a torch.dtype or dlb.Storage, got {spec!r}")
        device, dtype = None, None
        for part in spec.replace(",", "+").split("+"):
            part = part.strip().lower()
            if part in ("", "device"):
                continue
            if part in _DTYPES:
                dtype = _DTYPES[part]
            else:
                try:
                    device = torch.device(part)
                except RuntimeError:
                    raise ValueError(
                        f"unknown storage {spec!r}: use 'device' (default), 'cpu', 'bf16', "
                        "'fp16', 'fp32', a device name, or a combination such as 'cpu+bf16'"
                    ) from None
        return cls(device=device, dtype=dtype)


#: Relative tolerance of composite rules' sanity checks (recomputed vs recorded values);
#: looser while an explanation reads records cast to a low-precision dtype.
_CHECK_RTOL: ContextVar[float] = ContextVar("dlbhooks_check_rtol", default=1e-3)


def check_tolerance() -> float:
    """Relative tolerance for comparing recomputed values with recorded ones."""
    return _CHECK_RTOL.get()


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point:
        raise ValueError(f"records can only be cast to a floating-point dtype, not {dtype}")
    return dtype


def version_of(t: Tensor) -> int:
    """``t._version``, the counter of in-place changes; 0 for an inference tensor (made
    under ``torch.inference_mode()``), which has none and cannot be changed in place
    outside inference mode (where the trace runs and explanations are computed)."""
    return 0 if t.is_inference() else t._version


class Store:
    """Copies tensors into records under a :class:`Storage` policy and loads them back."""

    def __init__(self, policy: Storage):
        self.policy = policy
        # id(original) -> (weak ref to original, its _version, the copy)
        self._live: dict[int, tuple[weakref.ref, int, Tensor]] = {}
        # storage pointer -> [(weak ref to the storage, original's (shape, stride, offset,
        # dtype), its _version, the copy)]: a later view of a kept tensor becomes the same
        # view of the copy, even when the kept tensor object itself is gone
        self._by_storage: dict[int, list[tuple[weakref.ref, tuple, int, Tensor]]] = {}
        # id(copy) -> (copy, device and dtype of the original); the copy is a weak
        # reference once the records are being released (weaken)
        self._origin: dict[int, tuple[Any, torch.device, torch.dtype]] = {}
        # id(copy) -> (stored data, how many `loaded` blocks hold it)
        self._loaded: dict[int, list] = {}

    @property
    def active(self) -> bool:
        return not self.policy.default

    # -- while recording --------------------------------------------------------------------
    def keep(self, t: Tensor) -> Tensor:
        """The tensor a record keeps for ``t`` (``t`` itself under the default policy)."""
        if not self.active:
            return t
        hit = self._live.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == version_of(t):
            return hit[2]
        copy = self._view_of_kept(t)
        if copy is None:
            copy = self._copy(t)
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                st = None
            if st is not None and st.data_ptr() and dense(t) and copy.stride() == t.stride():
                meta = (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype)
                self._by_storage.setdefault(st.data_ptr(), []).append(
                    (weakref.ref(st), meta, version_of(t), copy))
        self._live[id(t)] = (weakref.ref(t), version_of(t), copy)
        self._origin[id(copy)] = (copy, t.device, t.dtype)
        return copy

    def kept(self, t: Tensor) -> Tensor | None:
        """What a record keeps for ``t`` if one already does (its copy, or the same view of
        a copy), without copying anything; ``t`` itself under the default policy."""
        if not self.active:
            return t
        hit = self._live.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == version_of(t):
            return hit[2]
        return self._view_of_kept(t)

    def keep_all(self, obj: Any) -> Any:
        """``obj`` with every tensor inside tuples, lists and dicts replaced by its copy."""
        if not self.active:
            return obj
        if isinstance(obj, Tensor):
            return self.keep(obj)
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(self.keep_all(o) for o in obj)
        if isinstance(obj, list):
            return [self.keep_all(o) for o in obj]
        if isinstance(obj, dict):
            return {k: self.keep_all(v) for k, v in obj.items()}
        return obj

    def _copy(self, t: Tensor) -> Tensor:
        dtype = self.policy.dtype if self.policy.dtype is not None and t.is_floating_point() \
            else t.dtype
        device = self.policy.device if self.policy.device is not None else t.device
        out = torch.empty_like(t, dtype=dtype, device=device)  # keeps a dense tensor's strides
        out.copy_(t.detach())
        return out

    def _view_of_kept(self, t: Tensor) -> Tensor | None:
        """The same view of a stored copy, if ``t`` is a view of a tensor already kept."""
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        for ref, (shape, stride, offset, dtype), version, copy in reversed(
            self._by_storage.get(st.data_ptr(), [])
        ):
            # the same storage still alive (not a new one at a reused address), unchanged
            # since the copy (views share their base's version counter), and t inside it
            if ref() is not st or version != version_of(t) or dtype != t.dtype:
                continue
            if not _inside(t, shape, stride, offset):
                continue
            return copy.as_strided(t.shape, t.stride(), t.storage_offset() - offset)
        return None

    # -- during the reverse pass -------------------------------------------------------------
    @contextmanager
    def checks(self):
        """Loosen sanity checks to the precision records were stored in, for a block."""
        dtype = self.policy.dtype
        rtol = 1e-3 if dtype is None else max(1e-3, 8 * torch.finfo(dtype).eps)
        token = _CHECK_RTOL.set(rtol)
        try:
            yield
        finally:
            _CHECK_RTOL.reset(token)

    def device_of(self, t: Tensor) -> torch.device:
        """The device that computed ``t`` (for a stored copy: its original's device)."""
        hit = self._origin_of(t) if self.active else None
        return t.device if hit is None else hit[0]

    def _origin_of(self, t: Tensor) -> tuple[torch.device, torch.dtype] | None:
        """Device and dtype of the original of the stored copy ``t``, if it is one."""
        hit = self._origin.get(id(t))
        if hit is None:
            return None
        copy = hit[0]() if isinstance(hit[0], weakref.ref) else hit[0]
        return None if copy is not t else (hit[1], hit[2])

    def weaken(self) -> None:
        """Keep no copy alive from here on (the records hold them until they are
        released, :meth:`~dlbhooks.records.Tape.start_release`); nothing more is kept."""
        self._live.clear()
        self._by_storage.clear()
        self._origin = {k: (weakref.ref(c), dev, dt)  # type: ignore[misc]
                        for k, (c, dev, dt) in self._origin.items()}

    @contextmanager
    def loaded(self, tensors):
        """Bring the stored ``tensors`` back to their original device and dtype (same
        objects) for the duration of the block."""
        if not self.active:
            yield
            return
        held: list[Tensor] = []
        try:
            for t in tensors:
                if isinstance(t, Tensor) and self._origin_of(t) is not None:
                    self._load(t, held)
            yield
        finally:
            for t in reversed(held):
                self._unload(t)

    def _load(self, t: Tensor, held: list[Tensor]) -> None:
        entry = self._loaded.get(id(t))
        if entry is not None:
            entry[1] += 1
            held.append(t)
            return
        origin = self._origin_of(t)
        assert origin is not None
        device, dtype = origin
        stored = t.data
        base = t._base
        if base is not None and self._origin_of(base) is not None:
            self._load(base, held)
            data = base.data.as_strided(t.shape, t.stride(), t.storage_offset())
        else:
            data = torch.empty_like(stored, dtype=dtype, device=device)
            data.copy_(stored)
        t.data = data
        self._loaded[id(t)] = [stored, 1]
        held.append(t)

    def _unload(self, t: Tensor) -> None:
        entry = self._loaded[id(t)]
        entry[1] -= 1
        if entry[1] == 0:
            t.data = entry[0]
            del self._loaded[id(t)]


def _inside(t: Tensor, shape: tuple, stride: tuple, offset: int) -> bool:
    """Every element of ``t`` lies in the dense span of a tensor ``(shape, stride, offset)``
    of the same storage (a dense tensor owns every position of its span)."""
    if t.numel() == 0:
        return False
    lo = t.storage_offset()
    hi = lo + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    end = offset + sum((s - 1) * st for s, st in zip(shape, stride))
    return offset <= lo and hi <= end


def record_tensors(rec) -> list[Tensor]:
    """Every tensor a record (and its descendants) holds: what a rule for it may read."""
    out: list[Tensor] = []
    stack = [rec]
    while stack:
        r = stack.pop()
        out.extend(r.inputs)
        out.extend(r.outputs)
        out.extend(r.snapshots.values())
        out.extend(r.input_views.values())
        out.extend(r.output_views.values())
        out.extend(t for _, t in tensor_leaves(r.arguments))
        stack.extend(r.children)
    return out
