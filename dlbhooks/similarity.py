"""Why are two sentences similar? Relevance for a sentence-embedding similarity.

For mean-pooling sentence encoders such as all-MiniLM-L6-v2 (sentence-transformers): the
embedding of a sentence is the mean of ``last_hidden_state`` over its non-pad tokens,
L2-normalised; the similarity of two sentences is the dot product (cosine) of their
embeddings, ``s = Σ_d u_d·v_d``.

The seed (:func:`pair_seed`), for sentence A (for B swap ``u`` and ``v``, which gives the
same per-dimension values):

1. Dimension ``d`` of A's embedding contributed ``c_d = u_d·v_d`` to ``s`` (these sum to
   ``s`` exactly). It gets relevance ``R_d = multiplier·c_d``, signed: dimensions where
   the two embeddings agree in sign support the similarity, the others oppose it. So the
   seeded total is ``multiplier·s`` (100·cosine by default). In default mode the signed
   values propagate as they are (token scores are net: support minus opposition); in
   contrastive mode the positive ``c_d`` form the + stream and ``-c_d`` of the negative
   ones the - stream (``Σ+ - Σ- = multiplier·s``), each propagated on its own.
2. The L2 normalisation divides by a per-sentence constant, treated like a norm's
   statistics (METHOD.md §3): relevance passes through element-wise.
3. Mean pooling ``e_d = Σ_t (m_t/n)·h_td`` is a sum over tokens (positive weights, no
   bias), so the add rule (METHOD.md §3) splits ``R_d`` over the tokens by magnitude:
   ``R_td = R_d·m_t|h_td| / Σ_t' m_t'|h_t'd|``. Pad tokens (``m_t = 0``) get exactly 0.

The resulting tensor, shaped like ``last_hidden_state``, is the seed of one ordinary
``tape.explain(target=seed, output="last_hidden_state")``. Both sentences are run as one
padded batch of two rows, and each row is seeded with its own sentence's relevance; rows
never interact in the encoder, so a single reverse pass explains both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .errors import TargetError
from .integrations.accelerate import input_device
from .results import Explanation
from .trace import trace


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``hidden`` [batch, tokens, dim] over the tokens where ``mask`` is 1 (the
    model card's ``mean_pooling``)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def pair_seed(
    hidden: Tensor, mask: Tensor, multiplier: float = 100.0
) -> tuple[Tensor, float]:
    """Seed on ``last_hidden_state`` [2, tokens, dim] explaining the cosine similarity of
    the two rows' mean-pooled embeddings, and that similarity (see the module docstring).

    Row 0 carries sentence A's relevance, row 1 sentence B's; each row sums to
    ``multiplier·similarity`` (up to float rounding). Computed in float64, returned in
    ``hidden``'s dtype.
    """
    if hidden.dim() != 3 or hidden.shape[0] != 2 or mask.shape != hidden.shape[:2]:
        raise TargetError(
            f"pair_seed expects hidden [2, tokens, dim] and mask [2, tokens], got "
            f"{tuple(hidden.shape)} and {tuple(mask.shape)}"
        )
    h = hidden.detach().double()
    m = (mask != 0).to(h.dtype).unsqueeze(-1)  # [2, T, 1]
    if bool((m.sum(1) == 0).any()):
        raise TargetError("a sentence has no unmasked token: nothing to pool")
    e = mean_pool(h, mask)
    u = e / e.norm(dim=-1, keepdim=True)
    c = u[0] * u[1]  # [dim] contribution of each dimension to s; symmetric in A and B
    similarity = float(c.sum())
    share = m * h.abs()  # add rule over the tokens of each row
    den = share.sum(1, keepdim=True)
    share = torch.where(den > 0, share / den.clamp_min(torch.finfo(h.dtype).tiny), 0.0)
    seed = float(multiplier) * c * share  # [2, T, dim]
    return seed.to(hidden.dtype), similarity


@dataclass
class SentenceRelevance:
    """Relevance of one sentence's tokens (pads dropped) for the similarity.

    ``scores``: net relevance per token (``positive - negative`` in contrastive mode).
    ``seeded``: the net relevance put on this sentence's ``last_hidden_state``;
    ``absorbed = seeded - scores.sum()`` went to biases, LayerNorm shifts and the
    position/token-type embeddings on the way down.
    """

    text: str
    tokens: list[str]
    scores: Tensor
    seeded: float
    positive: Tensor | None = None
    negative: Tensor | None = None
    word_ids: list[int | None] | None = None

    @property
    def absorbed(self) -> float:
        return self.seeded - float(self.scores.double().sum())

    def top(self, k: int = 3, skip_special: bool = True) -> list[tuple[str, float]]:
        """The ``k`` words (see :meth:`words`) with the largest relevance, ``[CLS]``-like
        special tokens skipped unless ``skip_special=False``."""
        pairs = [(w, v) for w, v in self.words() if not (skip_special and _special(w))]
        return sorted(pairs, key=lambda p: -p[1])[:k]

    def words(self) -> list[tuple[str, float]]:
        """Relevance per word: word pieces summed (needs a fast tokenizer's word ids;
        otherwise one entry per token). Special tokens stay on their own."""
        if self.word_ids is None:
            return [(t, float(s)) for t, s in zip(self.tokens, self.scores)]
        out: list[tuple[str, float]] = []
        last = None
        for t, s, w in zip(self.tokens, self.scores, self.word_ids):
            if w is not None and w == last:
                piece = t[2:] if t.startswith("##") else t
                out[-1] = (out[-1][0] + piece, out[-1][1] + float(s))
            else:
                out.append((t, float(s)))
            last = w
        return out


@dataclass
class SimilarityExplanation:
    """Which tokens of ``a`` and ``b`` made them similar (see :func:`explain_similarity`).

    ``explanation`` is the underlying :class:`~dlbhooks.Explanation` of the padded batch
    (row 0 = A, row 1 = B; its ``inputs["input_ids"]`` includes the pads, which get 0).
    """

    a: SentenceRelevance
    b: SentenceRelevance
    similarity: float
    mode: str
    multiplier: float
    explanation: Explanation
    batch: dict[str, Tensor] = field(repr=False, default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"cosine similarity {self.similarity:.4f} (mean-pooled, normalised embeddings); "
            f"mode {self.mode}; seeded {self.multiplier:g} x similarity = "
            f"{self.multiplier * self.similarity:.2f} per sentence"
        ]
        for name, s in (("A", self.a), ("B", self.b)):
            lines.append(f"{name}: {s.text!r}")
            lines.append("   " + "  ".join(f"{w} {v:+.2f}" for w, v in s.words()))
            top = ", ".join(f"{t} ({v:.2f})" for t, v in s.top(3))
            lines.append(f"   top: {top}; absorbed {s.absorbed:.2f} "
                         "(biases, LayerNorm shifts, position/type embeddings)")
        return "\n".join(lines)


def explain_similarity(
    model: nn.Module,
    tokenizer: Any,
    a: str,
    b: str,
    mode: str = "default",
    *,
    multiplier: float = 100.0,
    max_length: int | None = 256,
    **explain_kwargs: Any,
) -> SimilarityExplanation:
    """Explain the cosine similarity of sentences ``a`` and ``b`` under a mean-pooling
    encoder ``model`` (a transformers encoder returning ``last_hidden_state``, in eval
    mode) with its ``tokenizer``. ``mode``: ``"default"`` (net token scores) or
    ``"contrastive"`` (also ``positive``/``negative`` per token). ``max_length`` truncates
    like sentence-transformers' ``max_seq_length`` (256 for all-MiniLM-L6-v2). Extra
    keyword arguments go to ``tape.explain`` (e.g. ``saturation``)."""
    if mode not in ("default", "contrastive"):
        raise TargetError(f"unknown mode {mode!r}; choose 'default' or 'contrastive'")
    if model.training:
        raise TargetError("the model is in training mode (dropout active); call model.eval()")
    enc = tokenizer([a, b], padding=True, truncation=max_length is not None,
                    max_length=max_length, return_tensors="pt")
    device = input_device(model)
    batch = {k: v.to(device) for k, v in enc.items()}
    with torch.no_grad(), trace(model) as tape:
        out = model(**batch)
    hidden = out["last_hidden_state"] if isinstance(out, dict) else out[0]
    mask = batch["attention_mask"]
    seed, similarity = pair_seed(hidden, mask, multiplier)
    exp = tape.explain(target=seed, output="last_hidden_state", mode=mode, **explain_kwargs)

    seeded = seed.double().sum(dim=(1, 2))
    rel = exp.inputs["input_ids"]
    sentences = []
    for row, text in enumerate((a, b)):
        keep = mask[row] != 0
        ids = batch["input_ids"][row][keep].tolist()
        try:
            word_ids = enc.word_ids(row)
            word_ids = [w for w, k in zip(word_ids, keep.tolist()) if k]
        except (AttributeError, ValueError):
            word_ids = None
        streams = (None, None)
        if exp.positive is not None and exp.negative is not None:
            streams = (exp.positive["input_ids"][row][keep], exp.negative["input_ids"][row][keep])
        sentences.append(SentenceRelevance(
            text=text, tokens=tokenizer.convert_ids_to_tokens(ids), scores=rel[row][keep],
            seeded=float(seeded[row]), positive=streams[0], negative=streams[1],
            word_ids=word_ids,
        ))
    return SimilarityExplanation(
        a=sentences[0], b=sentences[1], similarity=similarity, mode=mode,
        multiplier=float(multiplier), explanation=exp, batch=batch,
    )


def _special(token: str) -> bool:
    return token.startswith(("[", "<")) and token.endswith(("]", ">"))
