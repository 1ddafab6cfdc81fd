"""Helpers shared by composite rules (rules that handle a module's functional code and walk
its children's records) and by the rules that split relevance per contrastive stream.

* Streams: :func:`streams_of` / :func:`~dlbhooks.relevance.stack` (a stacked relevance
  as a list of tensors and back), :func:`first_stream` (a tensor to read shape and dtype
  from), :func:`per_stream` (a function of one tensor applied to each stream, its results
  stacked) and :func:`add_split` (the add rule of METHOD.md §3 on each stream).
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

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import scratch
from ..errors import UnsupportedModuleError
from ..relevance import Rel, per_stream, stack, streams_of
from .elementwise import add_rule

if TYPE_CHECKING:
    from ..records import Record

__all__ = [
    "LINEAR", "MATMUL", "add_split", "first_stream", "linear_adj", "linear_fwd",
    "matmul_adj", "matmul_fwd", "per_stream", "require_child", "stack", "streams_of",
]


# -- streams ----------------------------------------------------------------------------------


def first_stream(R: Rel) -> Tensor:
    """The first stream of the stacked ``R``: a tensor to read the shape or dtype from."""
    return R[0]


def add_split(R: Rel, terms: list[Tensor]) -> tuple[list[Rel], Tensor]:
    """The add rule (``y = Σ_k a_k``, METHOD.md §3) on each stream of the stacked ``R``:
    the relevance of each term and what was lost per stream (``[S]``: positions where
    every term is 0); see :func:`~dlbhooks.rules.elementwise.add_rule`. Several stack
    entries (targets, streams) share the terms' magnitudes and their sum."""
    if R.shape[0] == 1:
        return per_stream(lambda r: add_rule(r, terms), R)
    return add_rule(R, terms, stacked=True)


# -- linear maps ------------------------------------------------------------------------------


def linear_fwd(x: Tensor, W: Tensor) -> Tensor:
    """``x @ Wᵀ`` (weights stored [out, in], as ``nn.Linear``)."""
    return x @ W.T


def linear_into(x: Tensor, W: Tensor, key: str) -> Tensor:
    """:func:`linear_fwd` written to the scratch buffer ``key`` (a temporary the caller
    uses up before the next one under that key). A vector ``x``: a new tensor."""
    if x.dim() < 2:  # (matmul's out= would be resized from [out] to [1, out])
        return linear_fwd(x, W)
    out = scratch.buffer(key, (*x.shape[:-1], W.shape[0]), torch.result_type(x, W), x.device)
    return torch.matmul(x, W.T, out=out)


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
