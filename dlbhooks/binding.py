"""Naming a module call's arguments (:func:`bind_arguments`) and the tensors inside them
(:func:`tensor_leaves`)."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn


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
