"""Helpers shared by composite rules (rules that handle a module's functional code and walk
its children's records) and by the rules that split relevance per contrastive stream.

* Streams: :func:`streams_of` / :func:`join_streams` (a relevance as a list of tensors and
  back), :func:`first_stream` (a tensor to read shape and dtype from), :func:`per_stream`
  (a function of one tensor applied to each stream, its results re-paired) and
  :func:`add_split` (the add rule of METHOD.md §3 on each stream).
* Linear maps for :func:`~dlbhooks.rules.core.weighted_sum`: :data:`LINEAR` (``x @ Wᵀ``,
  ``nn.Linear``'s layout) and :data:`MATMUL` (``x @ W``: GPT-2's ``Conv1D``, GPT-OSS's
  experts), each a ``(forward, adjoint)`` pair.
* Child records: :meth:`Record.child <dlbhooks.records.Record.child>` finds one (among
  the descendants or, ``direct``, the children only; ``lift``: the child holding it);
  :func:`require_child` raises when the recorded forward made no such call.

Seeding a bag with a record's output relevance is the engine's
:meth:`~dlbhooks.engine.Engine.seed_outputs` (rules receive the engine as ``ctx``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..errors import UnsupportedModuleError
from ..relevance import Rel, Streams
from .elementwise import add_rule

if TYPE_CHECKING:
    from ..records import Record

__all__ = [
    "LINEAR", "MATMUL", "add_split", "first_stream", "join_streams", "linear_adj",
    "linear_fwd", "matmul_adj", "matmul_fwd", "per_stream", "require_child", "streams_of",
]


# -- streams ----------------------------------------------------------------------------------


def streams_of(R: Rel) -> list[Tensor]:
    """``[R]`` in default mode, ``[R⁺, R⁻]`` in contrastive mode."""
    return [R.pos, R.neg] if isinstance(R, Streams) else [R]


def join_streams(parts: list[Tensor]) -> Rel:
    """The inverse of :func:`streams_of`."""
    return Streams(*parts) if len(parts) == 2 else parts[0]


def first_stream(R: Rel) -> Tensor:
    """``R`` itself, or its positive stream: a tensor to read the shape or dtype from."""
    return R.pos if isinstance(R, Streams) else R


def per_stream(fn: Callable[[Tensor], Any], R: Rel) -> Any:
    """``fn`` (of one tensor) applied to each stream of ``R``, its results re-paired: a
    tensor result becomes :class:`Streams`, lists and tuples of results are re-paired
    element by element (nested: ``(parts, lost)``), ``None`` stays ``None``. In default
    mode, ``fn(R)``."""
    if not isinstance(R, Streams):
        return fn(R)
    return _pair(fn(R.pos), fn(R.neg))


def _pair(pos: Any, neg: Any) -> Any:
    if pos is None:
        return None
    if isinstance(pos, (list, tuple)):
        return type(pos)(_pair(p, n) for p, n in zip(pos, neg))
    return Streams(pos, neg)


def add_split(R: Rel, terms: list[Tensor]) -> tuple[list[Rel], Rel]:
    """The add rule (``y = Σ_k a_k``, METHOD.md §3) on each stream: the relevance of each
    term and what was lost (positions where every term is 0); see
    :func:`~dlbhooks.rules.elementwise.add_rule`."""
    return per_stream(lambda r: add_rule(r, terms), R)


# -- linear maps ------------------------------------------------------------------------------


def linear_fwd(x: Tensor, W: Tensor) -> Tensor:
    """``x @ Wᵀ`` (weights stored [out, in], as ``nn.Linear``)."""
    return x @ W.T


def linear_adj(s: Tensor, W: Tensor) -> Tensor:
    """The adjoint of :func:`linear_fwd`: ``s @ W``."""
    return s @ W


def matmul_fwd(x: Tensor, W: Tensor) -> Tensor:
    """``x @ W`` (weights stored [in, out]: GPT-2's ``Conv1D``, GPT-OSS's experts)."""
    return x @ W


def matmul_adj(s: Tensor, W: Tensor) -> Tensor:
    """The adjoint of :func:`matmul_fwd`: ``s @ Wᵀ``."""
    return s @ W.T


#: ``(forward, adjoint)`` of ``x @ Wᵀ`` and of ``x @ W``, for ``weighted_sum``.
LINEAR = (linear_fwd, linear_adj)
MATMUL = (matmul_fwd, matmul_adj)


# -- child records ----------------------------------------------------------------------------


def require_child(rec: Record, name: str, call: int = 0, *, lift: bool = False,
                  expected: str = "the one the rule was written for") -> Record:
    """``rec.child(name, call, lift=lift)`` (see :meth:`dlbhooks.records.Record.child`), or
    an :class:`~dlbhooks.errors.UnsupportedModuleError` when the recorded forward made no
    such call; ``expected`` names the forward the rule expects (in the message)."""
    found = rec.child(name, call, lift=lift)
    if found is None:
        raise UnsupportedModuleError(
            f"composite rule for {rec.describe()}: no recorded call of its child {name!r}; "
            f"the module's forward differs from {expected}. Register a rule for it with "
            "@dlb.register_rule."
        )
    return found
