"""How much memory records take: measured on a tape (:func:`record_bytes`, from
:mod:`dlbhooks.footprint`), predicted for a sequence length (:func:`estimate_memory`),
together with what the reverse pass adds on top of them.

Records hold every module's inputs and outputs until the reverse pass has used them, so
their size is what an explanation adds to a forward (an explanation with
``release=True``, as :func:`dlbhooks.explain` runs it, frees them behind its walk: then
the estimate is an upper bound). For a
transformer it grows with the sequence length ``T`` as ``a·T² + b·T + c`` (attention
probabilities and masks are ``T²``; hidden states, projections and MLP activations are
``T``). The reverse pass adds the relevance in flight and each rule's temporaries, which
grow linearly in ``T``, and the attention rule's blocks of one query chunk (``batch ·
heads · min(chunk, T) · T``). :func:`estimate_memory` traces and explains a few short
forwards, measures both and extrapolates, so it predicts a long explanation without
running it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import scratch
from .api import call_model, last_logits_only
from .engine import RECORD_OBSERVER
from .footprint import record_bytes
from .integrations.accelerate import input_device
from .rules.attention import DEFAULT_CHUNK
from .trace import trace


@dataclass
class MemoryEstimate:
    """Predicted memory of one explanation at ``seq_len`` tokens (see
    :func:`estimate_memory`): ``bytes`` of records, ``reverse_bytes`` the reverse pass adds
    on top of them (``explanation_bytes`` both)."""

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
    # the reverse pass: peak bytes of what it allocates, records aside, as
    # reverse_linear * T + reverse_constant + the attention blocks of one query chunk
    reverse_bytes: int = 0
    reverse_linear: float = 0.0
    reverse_constant: float = 0.0
    attention_chunk_bytes: int = 0
    reverse_probes: dict[int, int] = field(default_factory=dict)

    @property
    def per_token(self) -> float:
        """Bytes of records per token at ``seq_len`` (grows with T when the T² term
        matters)."""
        return self.bytes / max(self.seq_len, 1)

    @property
    def explanation_bytes(self) -> int:
        """Records plus the reverse pass's peak: the memory one explanation adds to the
        model's."""
        return self.bytes + self.reverse_bytes

    def __str__(self) -> str:
        top = ", ".join(f"{k} {_human(v)}" for k, v in list(self.by_type.items())[:5])
        text = (
            f"records at {self.seq_len} tokens × batch {self.batch_size} "
            f"(storage {self.storage}): {_human(self.bytes)} "
            f"(≈ {_human(self.per_token)} per token; T² term {_human(self.quadratic)}·T²)"
            + (f"; largest: {top}" if top else "")
        )
        if self.reverse_probes:
            text += (
                f"\nreverse pass: {_human(self.reverse_bytes)} more "
                f"(≈ {_human(self.reverse_linear)} per token + the attention blocks of one "
                f"query chunk, at most {_human(self.attention_chunk_bytes)}); explanation "
                f"{_human(self.explanation_bytes)} in all, the |W| cache aside"
            )
        return text


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
    reverse: bool = True,
    chunk: int | None = None,
) -> MemoryEstimate:
    """Predict the memory of one explanation at ``seq_len`` tokens: the records of the
    traced forward and what the reverse pass adds to them.

    Traces ``model`` at the (short) ``probe_lengths``, measures the records
    (:func:`record_bytes`, under the same ``storage`` policy as ``dlb.trace``), fits
    ``a·T² + b·T + c`` and evaluates it at ``seq_len``. ``make_inputs(seq_len,
    batch_size)`` returns the forward's inputs (a dict of keyword arguments, a tuple or a
    tensor); by default random ``input_ids`` for a Hugging Face model. The forward is
    ``dlb.explain``'s: a causal LM computes the last position's logits only (inputs that
    set ``logits_to_keep``, e.g. 0 for every position, are left as they are).

    ``reverse``: also explain each probe (default target, ``keep=False``) and measure the
    peak bytes of the tensors the reverse pass allocates; apart from the attention
    rule's blocks (at most ``3 · batch · heads · min(chunk, T) · T`` values, ``chunk`` the
    rule's query chunk: 128), they grow linearly in ``T`` and are extrapolated so. The
    ``|W|`` cache kept across explanations is not included (at most
    :func:`~dlbhooks.set_weight_cache`'s budget, 64 MiB by default). This costs four
    explanations of the short probes (the first fills the cache); a model offloaded to
    disk reads its weights for each, which ``reverse=False`` avoids.
    """
    if len(set(probe_lengths)) < 3:
        raise ValueError("estimate_memory needs three different probe lengths to fit a·T²+b·T+c")
    make = make_inputs or _token_inputs(model)
    probes: dict[int, int] = {}
    types: dict[int, dict[str, int]] = {}
    policy = None
    peaks: dict[int, int] = {}
    blocks: dict[int, int] = {}
    phases: dict[int, dict[str, int]] = {}
    for T in sorted(set(probe_lengths)):
        tape = _traced_probe(model, make(T, batch_size), storage)
        policy = tape.store.policy
        probes[T] = record_bytes(tape)
        types[T] = record_bytes(tape, by_type=True)
        if reverse:
            if not peaks:  # fill the |W| cache first: it is kept, not part of the peak
                tape.explain(keep=False)
            live = _measure_reverse(tape)
            peaks[T], blocks[T], phases[T] = live.peak, scratch.PEAK_BYTES[0], live.phases
        del tape
    a, b, c = _fit(probes)
    total = max(0, round(a * seq_len**2 + b * seq_len + c))
    est = MemoryEstimate(
        seq_len=seq_len, batch_size=batch_size, storage=str(policy), bytes=total,
        quadratic=a, linear=b, constant=c, probes=probes, by_type=_by_type(types, seq_len),
    )
    if reverse:
        _add_reverse(est, peaks, blocks, phases, chunk or DEFAULT_CHUNK)
    return est


def _traced_probe(model: nn.Module, inputs: Any, storage: Any) -> Any:
    """A tape of the forward ``dlb.explain`` runs on ``inputs`` (a causal LM: the last
    position's logits only, unless the inputs set ``logits_to_keep``)."""
    extra = last_logits_only(model, inputs, {})
    with trace(model, storage=storage) as tape:
        call_model(model, {**inputs, **extra} if extra else inputs)
    return tape


def _by_type(types: dict[int, dict[str, int]], seq_len: int) -> dict[str, int]:
    """Each module type's records at ``seq_len`` (a fit through the probes), largest
    first."""
    by_type = {}
    for name in set().union(*types.values()):
        qa, qb, qc = _fit({T: types[T].get(name, 0) for T in types})
        by_type[name] = max(0, round(qa * seq_len**2 + qb * seq_len + qc))
    return dict(sorted(by_type.items(), key=lambda kv: -kv[1]))


def _measure_reverse(tape: Any) -> _LiveBytes:
    """The bytes one explanation of ``tape`` allocates, in all and per record."""
    live = _LiveBytes()
    token = RECORD_OBSERVER.set(live.enter)
    try:
        with live:
            tape.explain(keep=False)
    finally:
        RECORD_OBSERVER.reset(token)
    return live


def _add_reverse(est: MemoryEstimate, peaks: dict[int, int], blocks: dict[int, int],
                 phases: dict[int, dict[str, int]], chunk: int) -> None:
    """The reverse pass's part of ``est``. Its peak comes in different places at
    different lengths (a large constant in the middle layers of a short input, the
    relevance at the widest layers of a long one, or on a GPU the seed at an LM's logits,
    ``T × vocab``), so each record's peak without the
    scratch blocks gets its own line through the probes and the estimate takes the
    largest at ``seq_len``; plus the attention blocks, scaled from ``T·min(chunk, T)`` at
    the longest probe."""
    longest = max(peaks)
    per_pair = blocks[longest] / (longest * min(chunk, longest))
    L = est.seq_len
    keys = set().union(*(p.keys() for p in phases.values()))
    best = (0.0, 0.0, 0.0)  # (bytes at L, slope, intercept)
    for key in keys:
        b, c = _fit({T: phases[T].get(key, 0) for T in phases}, degree=1)
        best = max(best, (b * L + c, b, c))
    est.attention_chunk_bytes = round(per_pair * L * min(chunk, L))
    est.reverse_linear, est.reverse_constant = best[1], best[2]
    est.reverse_bytes = max(0, round(best[0])) + est.attention_chunk_bytes
    est.reverse_probes = dict(peaks)


class _LiveBytes(TorchDispatchMode):
    """The bytes of the tensors that operators allocate while it is active, alive now and
    at most (``peak``). A storage counts from the operator that made it until the last
    tensor on it is gone; what existed before (records, weights) does not count."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0
        self.peak = 0
        self._live: dict[int, list[int]] = {}  # storage address -> [bytes, tensors on it]
        # per phase (the record being explained): the most bytes alive, scratch aside
        self.phases: dict[str, int] = {}
        self._phase = ""

    def enter(self, rec: Any) -> None:
        """The walk reached ``rec``: what is allocated from now on counts to its phase."""
        self._phase = rec.key
        self._note()

    def _note(self) -> None:
        held = self.now - scratch.HELD_BYTES[0]
        if held > self.phases.get(self._phase, -1):
            self.phases[self._phase] = held

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                self._track(t, aliases)
        return out

    def _track(self, t: Tensor, alias: bool) -> None:
        storage = t.untyped_storage()
        ptr, n = storage.data_ptr(), storage.nbytes()
        entry = self._live.get(ptr)
        if entry is None:
            if alias or n == 0:  # a view or an in-place result of something older
                return
            entry = self._live[ptr] = [n, 0]
            self.now += n
            self.peak = max(self.peak, self.now)
            self._note()
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self._live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._live[ptr]
            self.now -= entry[0]


def _fit(points: dict[int, int], degree: int = 2) -> tuple[float, ...]:
    """Least-squares polynomial of ``degree`` through the (T, bytes) points, in float64:
    its coefficients, highest power first (``a·T² + b·T + c`` -> ``(a, b, c)``)."""
    T = torch.tensor(sorted(points), dtype=torch.float64)
    y = torch.tensor([points[int(t)] for t in T.tolist()], dtype=torch.float64)
    A = torch.stack([T**k for k in range(degree, -1, -1)], dim=1)
    sol = torch.linalg.lstsq(A, y[:, None]).solution[:, 0]
    return tuple(float(v) for v in sol)
