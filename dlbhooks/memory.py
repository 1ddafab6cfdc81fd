"""How much memory records take: measured on a tape (:func:`record_bytes`, from
:mod:`dlbhooks.footprint`), predicted for a sequence length (:func:`estimate_memory`).

Records hold every module's inputs and outputs until the explanation is done (the
reverse pass needs them), so their size is what an explanation adds to a forward. For a
transformer it grows with the sequence length ``T`` as ``a·T² + b·T + c`` (attention
probabilities and masks are ``T²``; hidden states, projections and MLP activations are
``T``). :func:`estimate_memory` traces a few short forwards, measures their records and
fits that polynomial, so it predicts the records of a long forward without running it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .api import call_model
from .footprint import record_bytes
from .integrations.accelerate import input_device
from .trace import trace


@dataclass
class MemoryEstimate:
    """Predicted record size of one forward at ``seq_len`` tokens (see :func:`estimate_memory`)."""

    seq_len: int
    batch_size: int
    storage: str
    bytes: int
    # bytes = quadratic * T² + linear * T + constant (fitted on the probes)
    quadratic: float
    linear: float
    constant: float
    probes: dict[int, int] = field(default_factory=dict)
    by_type: dict[str, int] = field(default_factory=dict)

    @property
    def per_token(self) -> float:
        """Bytes per token at ``seq_len`` (grows with T when the T² term matters)."""
        return self.bytes / max(self.seq_len, 1)

    def __str__(self) -> str:
        top = ", ".join(f"{k} {_human(v)}" for k, v in list(self.by_type.items())[:5])
        return (
            f"records at {self.seq_len} tokens × batch {self.batch_size} "
            f"(storage {self.storage}): {_human(self.bytes)} "
            f"(≈ {_human(self.per_token)} per token; T² term {_human(self.quadratic)}·T²)"
            + (f"; largest: {top}" if top else "")
        )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _token_inputs(model: nn.Module) -> Callable[[int, int], dict[str, Any]]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab is None:
        raise ValueError(
            "estimate_memory needs make_inputs=(lambda seq_len, batch_size: ...) for a model "
            "without config.vocab_size (it builds input_ids for Hugging Face models only)"
        )
    device = input_device(model)

    def make(seq_len: int, batch_size: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
        return {"input_ids": ids.to(device)}

    return make


def estimate_memory(
    model: nn.Module,
    seq_len: int,
    batch_size: int = 1,
    *,
    storage: Any = None,
    make_inputs: Callable[[int, int], Any] | None = None,
    probe_lengths: Sequence[int] = (8, 16, 24),
) -> MemoryEstimate:
    """Predict the bytes the records of one traced forward at ``seq_len`` tokens will take.

    Traces ``model`` at the (short) ``probe_lengths``, measures the records
    (:func:`record_bytes`, under the same ``storage`` policy as ``dlb.trace``), fits
    ``a·T² + b·T + c`` and evaluates it at ``seq_len``. ``make_inputs(seq_len,
    batch_size)`` returns the forward's inputs (a dict of keyword arguments, a tuple or a
    tensor); by default random ``input_ids`` for a Hugging Face model.
    """
    if len(set(probe_lengths)) < 3:
        raise ValueError("estimate_memory needs three different probe lengths to fit a·T²+b·T+c")
    make = make_inputs or _token_inputs(model)
    probes: dict[int, int] = {}
    types: dict[int, dict[str, int]] = {}
    policy = None
    for T in sorted(set(probe_lengths)):
        inputs = make(T, batch_size)
        with trace(model, storage=storage) as tape:
            call_model(model, inputs)
        policy = tape.store.policy
        probes[T] = record_bytes(tape)
        types[T] = record_bytes(tape, by_type=True)
        del tape
    a, b, c = _fit(probes)
    total = max(0, round(a * seq_len**2 + b * seq_len + c))
    by_type = {}
    for name in set().union(*types.values()):
        qa, qb, qc = _fit({T: types[T].get(name, 0) for T in probes})
        by_type[name] = max(0, round(qa * seq_len**2 + qb * seq_len + qc))
    by_type = dict(sorted(by_type.items(), key=lambda kv: -kv[1]))
    return MemoryEstimate(
        seq_len=seq_len, batch_size=batch_size, storage=str(policy), bytes=total,
        quadratic=a, linear=b, constant=c, probes=probes, by_type=by_type,
    )


def _fit(points: dict[int, int]) -> tuple[float, float, float]:
    """Least-squares ``a·T² + b·T + c`` through the (T, bytes) points, in float64."""
    T = torch.tensor(sorted(points), dtype=torch.float64)
    y = torch.tensor([points[int(t)] for t in T.tolist()], dtype=torch.float64)
    A = torch.stack([T**2, T, torch.ones_like(T)], dim=1)
    sol = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
    return float(sol[0]), float(sol[1]), float(sol[2])
