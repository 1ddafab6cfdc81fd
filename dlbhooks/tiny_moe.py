"""The small language model that ships with dlbhooks: a byte-level Qwen3-MoE causal LM (4 layers,
8 experts, top-2) trained offline by ``scripts/train_tiny_moe.py`` on two domains rebuilt from the
running Python installation: ``"code"`` (the standard library's ``.py`` sources) and ``"prose"``
(the ``pydoc_data.topics`` help texts). See docs/tiny_moe.md.

    model, meta = load_tiny_moe()
    out = model.generate(encode("def ", bos=True)[None], max_new_tokens=80, do_sample=False)
    print(decode(out[0]))

Vocabulary: ids 0-255 are bytes, then ``BOS`` (start of a document), ``EOS`` (end of a document)
and ``PAD``. Documents are UTF-8 encoded; ``decode`` replaces invalid byte sequences.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch

ASSET_DIR = "tiny_moe"
BOS, EOS, PAD = 256, 257, 258
SPECIALS = {BOS: "<bos>", EOS: "<eos>", PAD: "<pad>"}
VOCAB_SIZE = 259
DOMAINS = ("code", "prose")
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.05      # held out: the last documents (sorted order), >= 5% of the bytes
CODE_CAP_BYTES = 4_000_000   # the code domain keeps every k-th source file to stay under this
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
              "pydoc_data"}  # pydoc_data is the prose domain


def asset_path() -> Path:
    """Folder of the shipped model (config.json, model.safetensors, corpus_meta.json)."""
    return Path(str(resources.files("dlbhooks") / "assets" / ASSET_DIR))


def load_tiny_moe(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
                  experts_implementation: str | None = None) -> tuple[torch.nn.Module, dict]:
    """The trained ``Qwen3MoeForCausalLM`` (eval mode, loaded offline with ``from_pretrained``)
    and the training metadata (corpus, settings, measured losses) from ``corpus_meta.json``.

    ``experts_implementation`` defaults to transformers' default (``"grouped_mm"``), except for
    float64, which ``grouped_mm`` does not support on CPU: there it is ``"eager"``. Keep prompt +
    generated tokens within the trained context (``config.max_position_embeddings`` = 128)."""
    from transformers import Qwen3MoeForCausalLM

    folder = Path(path) if path is not None else asset_path()
    if experts_implementation is None and dtype == torch.float64:
        experts_implementation = "eager"
    kwargs = {} if experts_implementation is None else \
        {"experts_implementation": experts_implementation}
    model = Qwen3MoeForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                **kwargs)
    meta = json.loads((folder / "corpus_meta.json").read_text())
    return model.eval(), meta


def encode(text: str | bytes, bos: bool = False, eos: bool = False) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a LongTensor [n] of ids 0-255, optionally framed by BOS/EOS."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() if data else \
        torch.empty(0, dtype=torch.long)
    parts = ([torch.tensor([BOS])] if bos else []) + [ids] + ([torch.tensor([EOS])] if eos else [])
    return torch.cat(parts)


def decode(ids: torch.Tensor | Iterable[int], specials: bool = False) -> str:
    """Text of a sequence of ids (1-D). Special ids are dropped, or written as ``<bos>`` etc.
    when ``specials``; invalid UTF-8 becomes U+FFFD."""
    seq = ids.reshape(-1).tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
    out, run = [], bytearray()
    for i in seq:
        if 0 <= i < 256:
            run.append(i)
            continue
        out.append(run.decode("utf-8", errors="replace"))
        run = bytearray()
        if specials:
            out.append(SPECIALS.get(i, f"<{i}>"))
    out.append(run.decode("utf-8", errors="replace"))
    return "".join(out)


def _code_documents() -> list[tuple[str, bytes]]:
    root = Path(os.__file__).resolve().parent
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if not _SKIP_DIRS & set(rel.parts[:-1]) and p.is_file():
            files.append((rel.as_posix(), p))
    files.sort()
    total = sum(p.stat().st_size for _, p in files)
    stride = max(1, -(-total // CODE_CAP_BYTES))
    return [(name, p.read_bytes()) for name, p in files[::stride]]


def _prose_documents() -> list[tuple[str, bytes]]:
    from pydoc_data.topics import topics

    return [(key, topics[key].encode("utf-8")) for key in sorted(topics)]


def documents(domain: str, split: str) -> list[tuple[str, bytes]]:
    """The (name, UTF-8 bytes) documents of one domain and split, in sorted order. The held-out
    split is the shortest tail of the sorted documents holding >= 5% of the domain's bytes."""
    if domain not in DOMAINS or split not in SPLITS:
        raise ValueError(f"domain must be one of {DOMAINS} and split one of {SPLITS}, "
                         f"got {domain!r}, {split!r}")
    docs = _code_documents() if domain == "code" else _prose_documents()
    total, tail, cut = sum(len(d) for _, d in docs), 0, len(docs)
    while cut > 1 and tail < HELDOUT_FRACTION * total:
        cut -= 1
        tail += len(docs[cut][1])
    return docs[:cut] if split == "train" else docs[cut:]


def corpus_ids(domain: str, split: str) -> torch.Tensor:
    """The token stream used for training / evaluation: every document as BOS bytes EOS."""
    docs = documents(domain, split)
    return torch.cat([encode(d, bos=True, eos=True) for _, d in docs])


def fingerprint(ids: torch.Tensor) -> str:
    """sha256 of a token stream (recorded in corpus_meta.json to detect a different stdlib)."""
    return hashlib.sha256(ids.to(torch.int16).numpy().tobytes()).hexdigest()


def corpus(domain: str, split: str, check: bool = True) -> str:
    """The offline corpus text of one domain/split: its documents joined by a blank line.
    With ``check``, warns when the rebuilt corpus differs from the one the shipped model was
    trained on (another Python version has another standard library)."""
    if check:
        try:
            expected = json.loads((asset_path() / "corpus_meta.json").read_text())
            expected = expected["corpus"][domain][split]["sha256"]
        except (OSError, KeyError, ValueError):
            expected = None
        if expected is not None and fingerprint(corpus_ids(domain, split)) != expected:
            warnings.warn(f"the {domain}/{split} corpus rebuilt from this Python installation "
                          "differs from the one the shipped tiny MoE was trained on",
                          stacklevel=2)
    return "\n\n".join(d.decode("utf-8", errors="replace") for _, d in documents(domain, split))
