"""What recording torch functions (METHOD §7) costs the traced forward: time and record bytes.

For each model, the traced forward (``with dlb.trace(model, functions=...)``) runs with
function recording on and off, alternating, ``--repeats`` times each (after a warm-up), in
one process; the script prints the medians, the overhead of recording in per cent, the
record bytes both ways (``dlb.record_bytes``) and how many function calls were recorded.

* ``llama-110m``: the random ~110M Llama of ``scripts/bench_llm.py`` at ``--tokens``
  (every module of a transformers Llama has a rule: recording is active only in the
  top-level ``forward``);
* ``resnet18``: torchvision's ResNet-18, 1×3×224×224 (composites for its blocks);
* ``unet``: a small hand-written UNet whose glue is all functional (``F.relu``,
  ``F.max_pool2d``, ``F.interpolate``, ``torch.cat``): the worst case for recording.

    python scripts/bench_recording.py [--repeats 15] [--threads 2] [--tokens 128]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dlbhooks as dlb  # noqa: E402
from dlbhooks.rules.functions import FunctionCall  # noqa: E402


class UNet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.d1, self.d2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 2 * c, 3, padding=1)
        self.mid = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.u2, self.u1 = nn.Conv2d(4 * c, c, 3, padding=1), nn.Conv2d(2 * c, c, 3, padding=1)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        a = F.relu(self.d1(x))
        b = F.relu(self.d2(F.max_pool2d(a, 2)))
        m = F.relu(self.mid(F.max_pool2d(b, 2)))
        u = F.relu(self.u2(torch.cat([F.interpolate(m, scale_factor=2), b], 1)))
        u = F.relu(self.u1(torch.cat([F.interpolate(u, scale_factor=2), a], 1)))
        return self.out(u)


def models(tokens: int):
    import torchvision
    from bench_llm import CONFIG
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(**CONFIG)).eval()
    llama.config.use_cache = False
    ids = torch.randint(0, CONFIG["vocab_size"], (1, tokens))
    yield "llama-110m", llama, {"input_ids": ids}
    yield "resnet18", torchvision.models.resnet18().eval(), {"x": torch.randn(1, 3, 224, 224)}
    yield "unet", UNet().eval(), {"x": torch.randn(1, 3, 128, 128)}


def traced(model: nn.Module, inputs: dict, functions: bool) -> tuple[float, object]:
    start = time.perf_counter()
    with dlb.trace(model, functions=functions) as tape:
        model(**inputs)
    return time.perf_counter() - start, tape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32, medians of "
          f"{args.repeats} alternating runs of the traced forward (after a warm-up)")
    print(f"{'model':12} {'off ms':>8} {'on ms':>8} {'overhead':>9} {'bytes off':>12} "
          f"{'bytes on':>12} {'more':>6} {'functions':>9}")
    for name, model, inputs in models(args.tokens):
        times: dict[bool, list[float]] = {False: [], True: []}
        tapes = {}
        for on in (False, True):
            traced(model, inputs, on)  # warm-up
        for _ in range(args.repeats):
            for on in (False, True):
                t, tape = traced(model, inputs, on)
                times[on].append(t)
                tapes[on] = tape
        off, on = (statistics.median(times[k]) for k in (False, True))
        b_off, b_on = (dlb.record_bytes(tapes[k]) for k in (False, True))
        n_fn = sum(isinstance(r.module, FunctionCall) for r in tapes[True].records)
        print(f"{name:12} {off * 1e3:8.1f} {on * 1e3:8.1f} {100 * (on / off - 1):8.1f}% "
              f"{b_off:12,d} {b_on:12,d} {100 * (b_on / b_off - 1):5.1f}% {n_fn:9d}")


if __name__ == "__main__":
    main()
