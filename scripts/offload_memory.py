"""Peak resident memory of trace + explain on a model whose weights are all on disk.

Builds a random Llama of about ``--size-mb`` MB (fp32), saves it as safetensors, reloads
it with every module offloaded to disk (``device_map={"": "disk"}``), then measures the
process's peak resident memory (Linux ``VmHWM``, reset after loading) while one prompt is
traced and explained. accelerate loads each module's weights only inside its forward,
and dlbhooks loads them again, one module at a time, only while that module's rule runs,
so the peak stays near the largest module plus the records, far below the model.

    python scripts/offload_memory.py --size-mb 400 [--tokens 16] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _status(key: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def build(folder: Path, size_mb: int, layers: int = 6) -> tuple[int, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    # per layer: 4·H² (attention) + 3·H·4H (MLP) = 16·H² parameters of 4 bytes
    hidden = int(((size_mb * 2**20) / (layers * 16 * 4)) ** 0.5) // 64 * 64
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=hidden // 64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    del model
    gc.collect()
    return size, largest


def measure(folder: Path, offload: Path, tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    import dlbhooks as dlb

    model = AutoModelForCausalLM.from_pretrained(folder, device_map={"": "disk"},
                                                 offload_folder=str(offload)).eval()
    on_meta = sum(p.device.type == "meta" for p in model.parameters())
    ids = torch.randint(0, 512, (1, tokens), generator=torch.Generator().manual_seed(0))
    gc.collect()
    base = _status("VmRSS")
    _reset_peak()
    with dlb.trace(model) as tape:
        model(input_ids=ids)
    traced = _status("VmHWM")
    exp = tape.explain()
    peak = _status("VmHWM")
    rel = exp.inputs["input_ids"]
    return {"baseline_rss": base, "peak_rss": peak, "peak_increase": peak - base,
            "peak_increase_traced": traced - base,
            "records": dlb.record_bytes(tape), "finite": bool(torch.isfinite(rel).all()),
            "params_on_meta": on_meta, "params": sum(1 for _ in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=int, default=400)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    ap.add_argument("--build", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.build:  # in its own process, so that building leaves nothing resident here
        print(json.dumps(build(Path(args.build), args.size_mb)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder, offload = Path(tmp) / "model", Path(tmp) / "offload"
        done = subprocess.run(
            [sys.executable, __file__, "--build", str(folder), "--size-mb", str(args.size_mb)],
            check=True, capture_output=True, text=True)
        size, largest = json.loads(done.stdout.strip().splitlines()[-1])
        out = measure(folder, offload, args.tokens)
    out.update(model_bytes=size, largest_param_bytes=largest,
               ratio=out["peak_increase"] / size)
    if args.json:
        print(json.dumps(out))
        return
    mb = 2**20
    print(f"model weights        {size / mb:8.1f} MiB (largest tensor {largest / mb:.1f} MiB)")
    print(f"params on meta       {out['params_on_meta']} of {out['params']}")
    print(f"RSS before trace     {out['baseline_rss'] / mb:8.1f} MiB")
    print(f"peak during explain  {out['peak_rss'] / mb:8.1f} MiB (during the traced forward: "
          f"{(out['baseline_rss'] + out['peak_increase_traced']) / mb:.1f} MiB)")
    print(f"increase             {out['peak_increase'] / mb:8.1f} MiB = "
          f"{out['ratio']:.3f} × the model")
    print(f"records              {out['records'] / mb:8.1f} MiB")


if __name__ == "__main__":
    main()
