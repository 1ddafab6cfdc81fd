"""Memory of pruning a checkpoint on disk (``prune_checkpoint``): peak resident memory of a
process that prunes a sharded checkpoint, against the checkpoint's size and its largest
shard. The checkpoint (a random Qwen3-MoE in bfloat16, written by ``save_pretrained`` in
shards) is built in another process, so this process never holds the model.

    python scripts/bench_prune_checkpoint.py [--layers 8] [--experts 32] [--shard 100MB]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUILD = """
import sys, torch, transformers
layers, experts, shard, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
cfg = transformers.Qwen3MoeConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024,
    moe_intermediate_size=512, num_hidden_layers=layers, num_attention_heads=8,
    num_key_value_heads=4, head_dim=64, num_experts=experts, num_experts_per_tok=4)
torch.manual_seed(0)
with torch.device("cpu"):
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
model.save_pretrained(out, max_shard_size=shard)
"""


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--shard", default="100MB")
    ap.add_argument("--fraction", type=float, default=0.25)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dlb-prune-bench-"))
    src = work / "src"
    subprocess.run([sys.executable, "-c", BUILD, str(args.layers), str(args.experts),
                    args.shard, str(src)], check=True)
    import transformers

    from dlbhooks.analysis.checkpoint import moe_layout, prune_checkpoint  # after the build

    layout = moe_layout(transformers.AutoConfig.from_pretrained(src))
    before = rss_mib()
    n = int(round(args.fraction * args.experts))
    plan = {p: list(range(i % 3, i % 3 + n)) for i, p in enumerate(layout)}
    t0 = time.time()
    summary = prune_checkpoint(src, plan, work / "out")
    seconds = time.time() - t0
    peak = rss_mib()
    shards = sorted(src.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in shards) / 2**20
    largest = max(f.stat().st_size for f in shards) / 2**20
    out_total = sum(f.stat().st_size for f in (work / "out").glob("*.safetensors")) / 2**20
    print(json.dumps({"checkpoint_MiB": round(total, 1), "shards": len(shards),
                      "largest_shard_MiB": round(largest, 1),
                      "pruned_MiB": round(out_total, 1),
                      "rss_before_MiB": round(before, 1), "peak_rss_MiB": round(peak, 1),
                      "growth_MiB": round(peak - before, 1), "seconds": round(seconds, 2),
                      "parameters": [summary["parameters_before"],
                                     summary["parameters_after"]]}))
    print(f"pruning a {total:.0f} MiB checkpoint in {len(shards)} shards (largest "
          f"{largest:.0f} MiB) raised the peak RSS by {peak - before:.0f} MiB "
          f"({(peak - before) / total:.2f} of the checkpoint, "
          f"{(peak - before) / largest:.2f} of the largest shard) in {seconds:.1f} s")


if __name__ == "__main__":
    main()
