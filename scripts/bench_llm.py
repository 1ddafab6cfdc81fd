"""Explanation cost of a ~100M-parameter Llama on CPU: time and peak memory vs a forward.

A random LlamaForCausalLM (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, tied
embeddings: ~110M parameters), fp32, ``torch.set_num_threads(2)``, batch 1, at each length:

* forward: ``model(input_ids, use_cache=False)`` under ``torch.no_grad``, eager attention;
* explanation: recorded forward (``dlb.trace``) + ``tape.explain(keep=False)`` of the
  argmax token at the last position;
* gradient x input: forward on ``inputs_embeds`` with grad on them (parameters frozen) +
  backward of the target logit, then ``grad * embeds`` summed per token;
* k targets (default 4): ``dlb.explain_generation`` with a given continuation of k tokens
  (one recorded forward + k reverse passes) vs k independent explanations (k recorded
  forwards + k reverse passes) of the same full-length sequence. The time ratio is printed
  next to (2+k)/(3k) and next to the ratio predicted from the measured split of one
  explanation into recorded forward and reverse pass, (fwd + k·rev) / (k·(fwd + rev)).

Every measurement runs in a fresh subprocess (the model is rebuilt from the same seed), so
memory of one measurement never hides another's. Peak memory: after building the model
and its inputs the process resets its resident-set high-water mark (``/proc/self/clear_refs``
with ``5``, Linux) and notes its RSS; the first (warm-up) run's increase is ``VmHWM - RSS``.
Where the reset is not possible a psutil thread samples RSS every millisecond instead.
Times are the fastest of ``--repeats`` runs after the warm-up (the run least disturbed by
other work on the machine; the medians are in the JSON each worker prints).

    python scripts/bench_llm.py [--lengths 128 512] [--repeats 3] [--k 4] [--profile 512]
                                [--weight-cache MIB]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time

CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
              num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=4096,
              tie_word_embeddings=True)
KINDS = ["forward", "explain", "gradxinput", "shared_k", "independent_k"]


# -- memory -------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


class PeakRSS:
    """Peak RSS increase (MiB) over a block: the kernel's high-water mark reset on entry
    (``clear_refs``), or else a 1 ms psutil sampling thread."""

    def __enter__(self):
        gc.collect()
        self.method = "VmHWM reset"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kb("VmRSS")
        except OSError:
            import psutil

            self.method = "psutil sampling (1 ms)"
            proc = psutil.Process()
            self.base = proc.memory_info().rss // 1024
            self.top = self.base
            self.stop = threading.Event()

            def sample():
                while not self.stop.is_set():
                    self.top = max(self.top, proc.memory_info().rss // 1024)
                    time.sleep(0.001)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.method == "VmHWM reset":
            top = _status_kb("VmHWM")
        else:
            self.stop.set()
            self.thread.join()
            top = self.top
        self.mib = max(top - self.base, 0) / 1024
        return None


# -- the worker: one measurement in a fresh process ---------------------------------------


def build(threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**CONFIG)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    model.set_attn_implementation("eager")
    return model


def worker(kind: str, length: int, repeats: int, threads: int, k: int) -> dict:
    import torch

    import dlbhooks as dlb

    model = build(threads)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, CONFIG["vocab_size"], (1, length),
                        generator=torch.Generator().manual_seed(1))
    split: dict[str, list[float]] = {"traced_forward": [], "reverse": []}

    if kind == "forward":
        def op():
            with torch.no_grad():
                return model(input_ids=ids, use_cache=False).logits
    elif kind == "explain":
        def op():
            c0 = time.process_time()
            with dlb.trace(model) as tape:
                model(input_ids=ids)
            c1 = time.process_time()
            exp = tape.explain(keep=False)
            split["traced_forward"].append(c1 - c0)
            split["reverse"].append(time.process_time() - c1)
            return exp
    elif kind == "gradxinput":
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            target = int(model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        emb_layer = model.get_input_embeddings()

        def op():
            emb = emb_layer(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb, use_cache=False).logits
            logits[0, -1, target].backward()
            return (emb.grad * emb).sum(-1).detach()
    elif kind == "shared_k":
        prompt, cont = ids[:, : length - k + 1], ids[0, length - k + 1:]
        cont = torch.cat([cont, cont.new_tensor([7])])  # k tokens: the sequence traced is ids

        def op():
            return dlb.explain_generation(model, prompt, generated_ids=cont)
    elif kind == "independent_k":
        targets = ids[0, length - k + 1:].tolist() + [7]

        def op():
            return [dlb.explain(model, {"input_ids": ids}, target=t, position=length - k + j,
                                keep=False) for j, t in enumerate(targets)]
    else:
        raise ValueError(kind)

    with PeakRSS() as mem:
        out = op()  # warm-up, and the memory measurement
    del out
    split = {key: [] for key in split}
    times, cpu = [], []
    for _ in range(repeats):
        gc.collect()
        t0, c0 = time.perf_counter(), time.process_time()
        out = op()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        del out
    res = {"kind": kind, "length": length, "time": min(times), "cpu": min(cpu),
           "median": statistics.median(times), "times": times, "cpus": cpu,
           "peak_mib": mem.mib, "mem_method": mem.method, "params": params}
    for key, v in split.items():
        if v:
            res[key] = min(v)
    return res


def profile(length: int, threads: int) -> None:
    """Self CPU time of each rule in one reverse pass (composites exclude their children),
    then torch's operator profile of one reverse pass."""
    from collections import defaultdict

    import torch

    import dlbhooks as dlb
    from dlbhooks.engine import Engine
    from dlbhooks.rules import registry

    model = build(threads)
    ids = torch.randint(0, CONFIG["vocab_size"], (1, length),
                        generator=torch.Generator().manual_seed(1))
    with dlb.trace(model) as tape:
        model(input_ids=ids)
    tape.explain(keep=False)  # warm-up
    self_time: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    stack: list[float] = []  # children's time of each open call
    original = Engine.propagate

    def timed(engine, rec, R_out):
        rule = registry.lookup(type(rec.module))
        leaf = rec.path.rsplit(".", 1)[-1] if rec.type_name == "Linear" else ""
        name = f"{rec.type_name} {leaf} [{rule.name if rule else 'walk children'}]"
        stack.append(0.0)
        t0 = time.process_time()
        try:
            return original(engine, rec, R_out)
        finally:
            dt = time.process_time() - t0
            inner = stack.pop()
            self_time[name] += dt - inner
            calls[name] += 1
            if stack:
                stack[-1] += dt

    Engine.propagate = timed
    try:
        t0 = time.process_time()
        tape.explain(keep=False)
        total = time.process_time() - t0
    finally:
        Engine.propagate = original
    print(f"\nReverse pass at {length} tokens: {total:.2f} CPU s; self CPU time per rule "
          "(a composite's own functional ops, excluding its children):")
    for name, t in sorted(self_time.items(), key=lambda kv: -kv[1]):
        if t / total >= 0.005:
            print(f"  {t:7.3f} s {100 * t / total:5.1f}%  {calls[name]:4d} calls  {name}")
    print(f"  {total - sum(self_time.values()):7.3f} s  outside rules (seed, result assembly)")

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        tape.explain(keep=False)
    print("\ntorch operators in one reverse pass (by self CPU time):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# -- the driver ---------------------------------------------------------------------------


def run_worker(kind: str, length: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--lengths",
           str(length), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--k", str(args.k)]
    if args.weight_cache is not None:
        cmd += ["--weight-cache", str(args.weight_cache)]
    env = dict(os.environ)
    if not args.spin:  # idle OpenMP threads sleep: CPU time counts work, not spinning
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} @ {length} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--profile", type=int, nargs="*", default=None,
                    help="profile the reverse pass at these lengths (default: the longest)")
    ap.add_argument("--spin", action="store_true",
                    help="leave OpenMP's wait policy alone (default: OMP_WAIT_POLICY=PASSIVE)")
    ap.add_argument("--json", help="also write every measurement (all run times) here")
    ap.add_argument("--weight-cache", type=int, default=None, metavar="MIB",
                    help="dlb.set_weight_cache budget in MiB (default: the library's, "
                         "256; 0 turns the |W| cache off)")
    ap.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.weight_cache is not None:
            import dlbhooks as dlb

            dlb.set_weight_cache(args.weight_cache * 2**20)
        print(json.dumps(worker(args.worker, args.lengths[0], args.repeats, args.threads,
                                args.k)))
        return
    if args.profile is not None:
        for length in args.profile or [max(args.lengths)]:
            profile(length, args.threads)
        return

    k = args.k
    results: dict[tuple[str, int], dict] = {}
    for length in args.lengths:
        for kind in KINDS:
            t0 = time.perf_counter()
            results[kind, length] = r = run_worker(kind, length, args)
            print(f"  [{kind} @ {length}: {r['time']:.2f} s, +{r['peak_mib']:.0f} MiB; "
                  f"wall {time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)

    if args.json:
        with open(args.json, "w") as f:
            json.dump([results[key] for key in results], f, indent=1)
    any_r = next(iter(results.values()))
    print(f"Random LlamaForCausalLM, {any_r['params'] / 1e6:.1f}M parameters "
          f"(hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, tied embeddings), "
          f"fp32, CPU, {args.threads} threads, batch 1, eager attention.")
    print(f"Times: fastest of {args.repeats} runs after a warm-up, wall clock and CPU time "
          "(all threads; idle OpenMP threads sleep). Ratios use CPU time, which other work on "
          "the machine disturbs far less than wall time.")
    print(f"Memory: peak RSS increase during the warm-up run, each measurement in a fresh "
          f"process ({any_r['mem_method']}).")
    try:
        load = os.getloadavg()
        print(f"Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
              f"on {os.cpu_count()} CPUs.")
    except OSError:
        pass
    print()
    head = (f"{'tokens':>6} | {'what':<40} | {'wall s':>7} | {'cpu s':>7} | {'x fwd':>6} | "
            f"{'peak +MiB':>9} | {'x fwd':>6}")
    print(head)
    print("-" * len(head))
    for length in args.lengths:
        f = results["forward", length]
        fc, fm = f["cpu"], max(f["peak_mib"], 1e-9)

        def line(label, r, length=length, fc=fc, fm=fm):
            print(f"{length:>6} | {label:<40} | {r['time']:7.2f} | {r['cpu']:7.2f} | "
                  f"{r['cpu'] / fc:6.2f} | {r['peak_mib']:9.0f} | {r['peak_mib'] / fm:6.2f}")

        def part(label, c, length=length, fc=fc):
            print(f"{length:>6} |   {label:<38} | {'':>7} | {c:7.2f} | {c / fc:6.2f} |")

        line("forward (no grad)", f)
        e = results["explain", length]
        line("explanation (traced fwd + explain)", e)
        part("of which traced forward", e["traced_forward"])
        part("of which reverse pass", e["reverse"])
        line("gradient x input (fwd + bwd)", results["gradxinput", length])
        s, ind = results["shared_k", length], results["independent_k", length]
        line(f"{k} targets: 1 traced fwd + {k} explains", s)
        line(f"{k} targets: {k} independent explanations", ind)
        fwd, rev = e["traced_forward"], e["reverse"]
        print(f"{length:>6} |   shared / independent = {s['cpu'] / ind['cpu']:.2f} (CPU), "
              f"{s['time'] / ind['time']:.2f} (wall); (2+k)/(3k) = {(2 + k) / (3 * k):.2f}; "
              f"from the measured split (fwd + k rev)/(k (fwd + rev)) = "
              f"{(fwd + k * rev) / (k * (fwd + rev)):.2f}")
        print("-" * len(head))


if __name__ == "__main__":
    main()
