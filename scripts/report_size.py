"""Size and time of the HTML report for the benchmark's ~110M Llama (12 layers × 12 heads)
explaining the last token of a ``--tokens``-token prompt (random weights, fp32, CPU).

    python scripts/report_size.py [--tokens 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dlbhooks as dlb  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bench_llm import CONFIG
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    ids = torch.randint(0, CONFIG["vocab_size"], (1, args.tokens))
    with dlb.trace(model) as tape:
        model(input_ids=ids)
    exp = tape.explain(keep=False)
    tokens = [f"tok{int(i)}" for i in ids[0]]
    start = time.perf_counter()
    page = exp.to_html(tokens, title="110M Llama")
    seconds = time.perf_counter() - start
    size = len(page.encode("utf-8"))
    print(f"{args.tokens} tokens, {len(exp.heads)} attention layers: report "
          f"{size / 2**20:.2f} MiB, written in {seconds:.2f} s")


if __name__ == "__main__":
    main()
