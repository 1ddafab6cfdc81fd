"""Explanation cost of a ~100M-parameter Llama on CPU: time and peak memory against a
forward and against gradient x input (one forward + one backward: the cost of LXT's
AttnLRP and of any gradient method).

A random LlamaForCausalLM (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, tied
embeddings: ~110M parameters), fp32, ``torch.set_num_threads(2)``, batch 1, transformers'
default attention (sdpa; the recorded forward runs it too), at each length:

* forward: ``model(input_ids, use_cache=False)`` under ``torch.no_grad``;
* gradient x input: forward on ``inputs_embeds`` with grad on them (parameters frozen) +
  backward of the target logit, then ``grad * embeds`` summed per token;
* gradient x input, last logits (``gxi1``): the same with ``logits_to_keep=1``, the
  vocabulary projection of the last position only (as ``dlb.explain``'s forward);
* explanation: ``dlb.explain(model, {"input_ids": ids}, keep=False)`` (a recorded forward
  + one reverse pass) of the arg-max token at the last position; its forward computes
  the last position's logits only (``logits_to_keep=1``);
* k targets on one forward: ``dlb.explain(..., targets=[...])`` with k next-token
  targets at the last position (one recorded forward + one reverse pass for all k),
  against k single explanations (each its own forward): the ratio is
  ``time(k targets) / (k · time(one explanation))``, next to (2+k)/(3k), the floor of a
  method whose one explanation costs three products per layer of which two (forward and
  denominators) are shared.

Times: one process per length runs every method in turn, ``--repeats`` rounds after a
warm-up round (alternating, so a slow spell of the machine hits all of them), and prints
medians; this under each OpenMP wait policy in turn (``--wait-policy``): the environment's
(unset, idle threads spin a while, as in any PyTorch program) and PASSIVE (idle threads
sleep at once, so CPU time counts work only, but each parallel operation pays for waking
them: ~70 us on a VM, where an explanation's many small operations pay more of it than
a backward's fewer). Memory: each method in a fresh process; after building the model and its inputs
the process resets its resident-set high-water mark (``/proc/self/clear_refs`` with ``5``,
Linux) and notes its RSS; the first run's increase is ``VmHWM - RSS`` (where the reset is
not possible a psutil thread samples RSS every millisecond). The explanation's process
also reports the bytes its records hold (``dlb.record_bytes``).

    python scripts/bench_llm.py [--lengths 128 512 2048] [--repeats 3] [--k 1 4 8]
                                [--profile 512] [--weight-cache MIB] [--json FILE]
                                [--wait-policy default|passive|both]
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
MEMORY_KINDS = ["forward", "gradxinput", "explain"]


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


# -- the workers ----------------------------------------------------------------------------


def build(threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**CONFIG)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    model.set_attn_implementation("sdpa")
    return model


def operations(model, length: int, ks: list[int]) -> dict:
    """The measured operations on one model and one input of ``length`` tokens."""
    import torch

    import dlbhooks as dlb

    ids = torch.randint(0, CONFIG["vocab_size"], (1, length),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, -1]
    top = logits.topk(max(ks)).indices.tolist()  # the k most likely next tokens
    emb_layer = model.get_input_embeddings()
    for p in model.parameters():  # gradient x input: gradients on the embeddings only
        p.requires_grad_(False)

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits

    def gradxinput():
        emb = emb_layer(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, use_cache=False).logits
        out[0, -1, top[0]].backward()
        return (emb.grad * emb).sum(-1).detach()

    def gradxinput_last():  # the same, with the last position's logits only
        emb = emb_layer(ids).detach().requires_grad_(True)
        out = model(inputs_embeds=emb, use_cache=False, logits_to_keep=1).logits
        out[0, -1, top[0]].backward()
        return (emb.grad * emb).sum(-1).detach()

    def explain():
        return dlb.explain(model, {"input_ids": ids}, target=top[0], keep=False)

    ops = {"forward": forward, "gradxinput": gradxinput, "gradxinput_last": gradxinput_last,
           "explain": explain}
    for k in ks:
        if k > 1:
            ops[f"targets_{k}"] = (lambda k=k: dlb.explain(
                model, {"input_ids": ids}, targets=top[:k], keep=False))
    return ops


def time_worker(length: int, repeats: int, threads: int, ks: list[int]) -> dict:
    """Every operation in turn, ``repeats`` rounds after a warm-up round: medians."""
    model = build(threads)
    ops = operations(model, length, ks)
    times: dict[str, list[float]] = {name: [] for name in ops}
    cpus: dict[str, list[float]] = {name: [] for name in ops}
    for op in ops.values():  # warm-up
        op()
    for _ in range(repeats):
        for name, op in ops.items():
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            out = op()
            times[name].append(time.perf_counter() - t0)
            cpus[name].append(time.process_time() - c0)
            del out
    return {"length": length, "params": sum(p.numel() for p in model.parameters()),
            "median": {n: statistics.median(v) for n, v in times.items()},
            "cpu_median": {n: statistics.median(v) for n, v in cpus.items()},
            "times": times, "cpus": cpus}


def memory_worker(kind: str, length: int, threads: int) -> dict:
    """Peak RSS increase of one run of ``kind`` in this (fresh) process."""
    import dlbhooks as dlb

    model = build(threads)
    ops = operations(model, length, [1])
    res: dict = {"kind": kind, "length": length}
    with PeakRSS() as mem:
        out = ops[kind]()
    del out
    if kind == "explain":  # the records' bytes, from a trace of the same forward (after)
        import torch

        ids = torch.randint(0, CONFIG["vocab_size"], (1, length),
                            generator=torch.Generator().manual_seed(1))
        from dlbhooks.api import last_logits_only

        inputs = {"input_ids": ids}  # the explanation's own forward (its logits kept)
        with dlb.trace(model) as tape:
            model(**inputs, **last_logits_only(model, inputs, {}))
        res["records_mib"] = dlb.record_bytes(tape) / 2**20
        del tape
    res.update(peak_mib=mem.mib, mem_method=mem.method)
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

    def timed(engine, rec, R_out, **kwargs):
        rule = registry.lookup(type(rec.module))
        leaf = rec.path.rsplit(".", 1)[-1] if rec.type_name == "Linear" else ""
        name = f"{rec.type_name} {leaf} [{rule.name if rule else 'walk children'}]"
        stack.append(0.0)
        t0 = time.process_time()
        try:
            return original(engine, rec, R_out, **kwargs)
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


#: OpenMP wait policies the times are taken under: ``default`` leaves OMP_WAIT_POLICY as
#: the environment has it (unset: idle threads spin a while before they sleep, what a
#: PyTorch program gets); ``passive`` sets PASSIVE (idle threads sleep at once: CPU time
#: counts work only, but every parallel operation pays for waking them)
POLICIES = ("default", "passive")


def run_worker(args, *extra: str, policy: str = "default") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--k", *map(str, args.k), *extra]
    if args.weight_cache is not None:
        cmd += ["--weight-cache", str(args.weight_cache)]
    env = dict(os.environ)
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {extra} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(args, timings: dict[str, dict[int, dict]],
           memory: dict[tuple[str, int], dict]) -> None:
    any_t = next(iter(next(iter(timings.values())).values()))
    print(f"Random LlamaForCausalLM, {any_t['params'] / 1e6:.1f}M parameters (hidden 768, 12 "
          f"layers, 12 heads, MLP 2048, vocab 32000, tied embeddings), fp32, CPU, "
          f"{args.threads} threads, batch 1, sdpa attention.")
    print(f"Times: medians of {args.repeats} alternating rounds in one process per length "
          "(wall clock). Memory: peak RSS increase of one run, each in a fresh process "
          f"({next(iter(memory.values()))['mem_method']}).")
    try:
        load = os.getloadavg()
        print(f"Load average at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
              f"on {os.cpu_count()} CPUs.")
    except OSError:
        pass
    for policy, timing in timings.items():
        print()
        _time_table(args, policy, timing)
    print("gxi1: gradient x input with logits_to_keep=1 (the last position's logits only, "
          "as dlb.explain's forward; gxi computes every position's, as LXT's examples do).")
    print("k=K: time of K targets in one explanation / K single explanations (floor "
          "(2+K)/(3K) in brackets).")
    print()
    head = (f"{'tokens':>6} | {'forward':>9} | {'grad x in':>9} | {'explain':>9} | "
            f"{'records':>9} | {'explain / (gxi + records)':>25}")
    print(head + "   (peak RSS increase, MiB)")
    print("-" * len(head))
    for length in args.lengths:
        f, g, e = (memory[kind, length] for kind in MEMORY_KINDS)
        bound = g["peak_mib"] + e["records_mib"]
        print(f"{length:>6} | {f['peak_mib']:9.0f} | {g['peak_mib']:9.0f} | "
              f"{e['peak_mib']:9.0f} | {e['records_mib']:9.0f} | "
              f"{e['peak_mib'] / bound:25.2f}")


def _time_table(args, policy: str, timing: dict[int, dict]) -> None:
    env = ("OMP_WAIT_POLICY=PASSIVE" if policy == "passive" else
           f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    print(f"Wait policy {policy} ({env}):")
    head = (f"{'tokens':>6} | {'forward':>8} | {'grad x in':>9} | {'explain':>8} | "
            f"{'expl/fwd':>8} | {'expl/gxi':>8} | {'expl/gxi1':>9} | " + " | ".join(
                f"{f'k={k}':>11}" for k in args.k))
    print(head)
    print("-" * len(head))
    for length, t in timing.items():
        m = t["median"]
        ratios = []
        for k in args.k:
            single = m["explain"]
            many = single if k == 1 else m[f"targets_{k}"]
            ratios.append(f"{many / (k * single):5.2f} ({(2 + k) / (3 * k):.2f})")
        print(f"{length:>6} | {m['forward']:7.2f}s | {m['gradxinput']:8.2f}s | "
              f"{m['explain']:7.2f}s | {m['explain'] / m['forward']:8.2f} | "
              f"{m['explain'] / m['gradxinput']:8.2f} | "
              f"{m['explain'] / m['gradxinput_last']:9.2f} | " + " | ".join(
                  f"{r:>11}" for r in ratios))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--profile", type=int, nargs="*", default=None,
                    help="profile the reverse pass at these lengths (default: the longest)")
    ap.add_argument("--wait-policy", choices=[*POLICIES, "both"], default="both",
                    help="OpenMP wait policy of the timed runs: the environment's "
                         "(default), PASSIVE, or both in turn (the default)")
    ap.add_argument("--json", help="also write every measurement (all run times) here")
    ap.add_argument("--weight-cache", type=int, default=None, metavar="MIB",
                    help="dlb.set_weight_cache budget in MiB (default: the library's; 0 "
                         "turns the |W| cache off)")
    ap.add_argument("--time-worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--memory-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.weight_cache is not None:
        import dlbhooks as dlb

        dlb.set_weight_cache(args.weight_cache * 2**20)
    if args.time_worker:
        print(json.dumps(time_worker(args.time_worker, args.repeats, args.threads, args.k)))
        return
    if args.memory_worker:
        kind, length = args.memory_worker
        print(json.dumps(memory_worker(kind, int(length), args.threads)))
        return
    if args.profile is not None:
        for length in args.profile or [max(args.lengths)]:
            profile(length, args.threads)
        return
    policies = POLICIES if args.wait_policy == "both" else (args.wait_policy,)
    timings: dict[str, dict[int, dict]] = {p: {} for p in policies}
    memory: dict[tuple[str, int], dict] = {}
    for length in args.lengths:
        for kind in MEMORY_KINDS:  # (the wait policy does not change memory)
            memory[kind, length] = r = run_worker(args, "--memory-worker", kind, str(length))
            print(f"  [memory {kind} @ {length}: +{r['peak_mib']:.0f} MiB]", file=sys.stderr,
                  flush=True)
        for policy in policies:
            t0 = time.perf_counter()
            timings[policy][length] = r = run_worker(args, "--time-worker", str(length),
                                                     policy=policy)
            print(f"  [times @ {length}, {policy}: {r['median']}; wall "
                  f"{time.perf_counter() - t0:.0f} s]", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"timing": {p: list(t.values()) for p, t in timings.items()},
                       "memory": list(memory.values())}, f, indent=1)
    report(args, timings, memory)


if __name__ == "__main__":
    main()
