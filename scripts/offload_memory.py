"""Peak memory of trace + explain on a model whose weights are all on disk.

Builds a random Llama of about ``--size-mb`` MB (fp32), saves it as safetensors, reloads
it with every module offloaded to disk (``device_map={"": "disk"}``), then traces and
explains one prompt. accelerate loads each module's weights only inside its forward, and
dlbhooks loads them again, one module at a time, only while that module's rule runs, so
the memory in use stays near the records plus the largest module, far below the model.
Two measures, as increases over the memory before tracing:

* ``held``: the largest, over the run, of the memory in use: bytes glibc's malloc has
  handed out and not had back (``mallinfo2``) plus file pages mapped in (``RssFile``:
  the weights read from the safetensors file), sampled after every forward call, every
  rule and every weight dlbhooks loads (while the rule holds it). The same in every run.
* ``peak``: the kernel's high-water mark of resident memory (``VmHWM``, reset before
  tracing), which also counts memory malloc got back but keeps for reuse: usually a
  little above ``held``, sometimes far above (how much malloc keeps varies from run to run).

    python scripts/offload_memory.py --size-mb 400 [--tokens 16] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
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


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mallinfo2():
    """glibc's ``mallinfo2`` (glibc >= 2.33), or ``None``."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    fn.restype = _Mallinfo2
    return fn


MALLINFO2 = _mallinfo2()


def _held() -> int:
    """Memory in use: malloc's chunks handed out (arenas and mmapped) + file pages mapped in."""
    info = MALLINFO2()
    return info.uordblks + info.hblkhd + _status("RssFile")


class HeldSampler:
    """The largest :func:`_held` after every module call, every rule and every weight
    dlbhooks loads, while installed (``with``)."""

    def __init__(self) -> None:
        self.top = 0

    def sample(self) -> None:
        self.top = max(self.top, _held())

    def __enter__(self) -> HeldSampler:
        from dlbhooks.engine import Engine
        from dlbhooks.integrations import accelerate as acc

        self._saved = Engine.propagate, acc.materialise
        propagate, materialise = self._saved

        def sampled_propagate(engine, rec, R_out, **kwargs):
            try:
                return propagate(engine, rec, R_out, **kwargs)
            finally:
                self.sample()

        def sampled_materialise(*args, **kwargs):
            value = materialise(*args, **kwargs)
            self.sample()  # the weight is loaded and held
            return value

        Engine.propagate, acc.materialise = sampled_propagate, sampled_materialise
        self._hook = torch.nn.modules.module.register_module_forward_hook(
            lambda *_: self.sample())
        return self

    def __exit__(self, *exc) -> None:
        from dlbhooks.engine import Engine
        from dlbhooks.integrations import accelerate as acc

        Engine.propagate, acc.materialise = self._saved
        self._hook.remove()


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
    sampler = HeldSampler() if MALLINFO2 is not None else None
    gc.collect()
    base, held_base = _status("VmRSS"), _held() if sampler else 0
    _reset_peak()
    with sampler or contextlib.nullcontext():
        with dlb.trace(model) as tape:
            model(input_ids=ids)
        traced = _status("VmHWM")
        exp = tape.explain()
    peak = _status("VmHWM")
    rel = exp.inputs["input_ids"]
    return {"baseline_rss": base, "peak_rss": peak, "peak_increase": peak - base,
            "peak_increase_traced": traced - base,
            "held_increase": sampler.top - held_base if sampler else None,
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
    held = out["held_increase"]
    out.update(model_bytes=size, largest_param_bytes=largest,
               ratio=out["peak_increase"] / size, held_ratio=None if held is None else held / size)
    if args.json:
        print(json.dumps(out))
        return
    mb = 2**20
    print(f"model weights        {size / mb:8.1f} MiB (largest tensor {largest / mb:.1f} MiB)")
    print(f"params on meta       {out['params_on_meta']} of {out['params']}")
    print(f"RSS before trace     {out['baseline_rss'] / mb:8.1f} MiB")
    print(f"peak during explain  {out['peak_rss'] / mb:8.1f} MiB (during the traced forward: "
          f"{(out['baseline_rss'] + out['peak_increase_traced']) / mb:.1f} MiB)")
    print(f"peak increase        {out['peak_increase'] / mb:8.1f} MiB = "
          f"{out['ratio']:.3f} × the model")
    if held is not None:
        print(f"held increase        {held / mb:8.1f} MiB = {out['held_ratio']:.3f} × the model "
              "(malloc in use + mapped files)")
    print(f"records              {out['records'] / mb:8.1f} MiB")


if __name__ == "__main__":
    main()
