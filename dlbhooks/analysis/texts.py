"""Text data for corpus runs: documents from plain-text or JSONL files, tokenized into one
stream, cut into windows.

    docs = read_documents(["code.jsonl", "notes.txt"])   # JSONL: one {"text": ...} per line
    tok = hf_tokenizer(tokenizer)                        # or byte_tokenizer() (tiny MoE)
    stream = token_stream(docs, tok)                     # every document framed by BOS/EOS
    rows = spread_windows(stream, n=256, length=65)      # [256, 65], evenly spread
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..tiny_moe import BOS, DOMAINS, EOS, SPLITS, documents, encode


class DataError(ValueError):
    """A data file that cannot be used, named with the reason."""


@dataclass(frozen=True)
class Tokenize:
    """``encode(text) -> ids`` of one document, and the ids that frame documents."""

    encode: Callable[[str], list[int]]
    bos: int | None
    eos: int | None
    name: str

    def document(self, text: str) -> list[int]:
        ids = self.encode(text)
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids = [self.bos, *ids]
        return ids + ([self.eos] if self.eos is not None else [])


def byte_tokenizer() -> Tokenize:
    """The shipped tiny MoE's byte-level vocabulary (``dlbhooks.tiny_moe``)."""
    return Tokenize(lambda text: encode(text).tolist(), BOS, EOS, "bytes")


def hf_tokenizer(tokenizer: Any) -> Tokenize:
    """A transformers tokenizer: its special tokens (BOS if it adds one), then EOS."""
    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])

    return Tokenize(encode, getattr(tokenizer, "bos_token_id", None),
                    getattr(tokenizer, "eos_token_id", None),
                    getattr(tokenizer, "name_or_path", type(tokenizer).__name__))


def read_documents(files: Sequence[str | Path]) -> list[str]:
    """The documents of ``files``: a ``.jsonl`` file holds one JSON object per line with a
    ``text`` field; any other file is one UTF-8 document; ``tiny-moe:DOMAIN[:SPLIT]`` is the
    shipped tiny MoE's text (``code`` or ``prose``; ``train`` or ``heldout``). Raises
    :class:`DataError` for a missing, unreadable or empty file, or a JSONL line without
    text."""
    if not files:
        raise DataError("no data files given")
    docs: list[str] = []
    for name in files:
        if str(name).startswith(SHIPPED_TEXT):
            docs.extend(_shipped(str(name)))
            continue
        path = Path(name)
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read it as UTF-8 text ({err})") from None
        if path.suffix == ".jsonl":
            found = _jsonl_texts(path, raw)
        else:
            found = [raw] if raw.strip() else []
        if not found:
            raise DataError(f"{path}: no text in it (empty file"
                            + (", or no line with a non-empty 'text')" if path.suffix
                               == ".jsonl" else ")"))
        docs.extend(found)
    return docs


SHIPPED_TEXT = "tiny-moe:"


def _shipped(spec: str) -> list[str]:
    domain, _, split = spec[len(SHIPPED_TEXT):].partition(":")
    split = split or "train"
    if domain not in DOMAINS or split not in SPLITS:
        raise DataError(f"{spec}: the shipped text is tiny-moe:DOMAIN[:SPLIT] with DOMAIN one "
                        f"of {list(DOMAINS)} and SPLIT one of {list(SPLITS)}")
    return [raw.decode("utf-8") for _, raw in documents(domain, split)]


def _jsonl_texts(path: Path, raw: str) -> list[str]:
    out = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise DataError(f"{path}, line {n}: not JSON ({err})") from None
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path}, line {n}: no string field 'text'")
        if text.strip():
            out.append(text)
    return out


def token_stream(docs: Sequence[str], tokenize: Tokenize) -> Tensor:
    """Every document tokenized and framed (BOS … EOS where the vocabulary has them), one
    LongTensor stream."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenize.document(doc))
    return torch.tensor(ids, dtype=torch.long)


def spread_windows(stream: Tensor, n: int, length: int) -> Tensor:
    """``n`` windows of ``length`` tokens with starts spread evenly over the stream (no
    randomness: the same windows on every process and every run). Windows overlap only
    when the stream holds fewer than ``n × length`` tokens."""
    if n < 1:
        raise DataError(f"the number of windows must be at least 1, got {n}")
    total = stream.numel()
    if total < length:
        raise DataError(f"the data holds {total} tokens, fewer than one window of {length}")
    last = total - length
    starts = torch.linspace(0, last, n).round().long() if n > 1 else torch.zeros(1).long()
    return torch.stack([stream[s:s + length] for s in starts.tolist()])


def consecutive_windows(stream: Tensor, length: int, limit: int | None = None) -> Tensor:
    """Non-overlapping windows of ``length`` tokens from the start (at most ``limit``)."""
    n = stream.numel() // length
    if limit is not None:
        n = min(n, limit)
    if n < 1:
        raise DataError(f"the data holds {stream.numel()} tokens, fewer than one window of "
                        f"{length}")
    return stream[: n * length].view(n, length)


def fingerprint(t: Tensor) -> str:
    """A short content hash of a tensor (which windows a run explains)."""
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]


def parse_positions(spec: str, length: int) -> list[int]:
    """Target positions in a window of ``length`` tokens the model reads: ``last``, a count
    ``K`` (spread over the last three quarters), or indices separated by commas."""
    spec = spec.strip()
    if spec == "last":
        return [length - 1]
    if spec.isdigit():
        k = int(spec)
        if not 1 <= k <= length:
            raise DataError(f"--positions {k}: between 1 and the window length {length}")
        if k == 1:
            return [length - 1]
        return sorted(set(torch.linspace(length // 4, length - 1, k).long().tolist()))
    try:
        pos = [int(p) for p in spec.split(",")]
    except ValueError:
        raise DataError(f"--positions: 'last', a count, or indices separated by commas; got "
                        f"{spec!r}") from None
    bad = [p for p in pos if not -length <= p < length]
    if bad:
        raise DataError(f"--positions {bad} outside a window of {length} tokens")
    return sorted({p % length for p in pos})
