"""Prune the least relevant experts per layer and compare with frequency and random pruning.

For each domain of the shipped tiny MoE (or ``--model`` folder with the same byte
vocabulary): build ExpertStats from explanations of that domain's training text, remove
25 % and 50 % of the experts of every MoE layer from routing by (a) relevance, (b) routing
frequency, (c) at random (several seeds), and report the held-out loss of every domain.
With ``--write-checkpoint DIR``, each domain's relevance-based plan is also written as a
smaller checkpoint (the experts physically removed) to ``DIR/<domain>-<percent>pct``, reloaded
and evaluated: its held-out loss must equal the masked-routing loss.

    python scripts/prune_experts.py --out docs/pruning_report.md [--sequences 48]
        [--write-checkpoint checkpoints/]
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

import dlbhooks as dlb
from dlbhooks.analysis.pruning import pruned, write_pruned_checkpoint
from dlbhooks.tiny_moe import DOMAINS, corpus_ids, load_tiny_moe


def windows(ids: torch.Tensor, n: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length - 1, (n,), generator=g)
    return torch.stack([ids[s:s + length + 1] for s in starts.tolist()])


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, length: int, max_windows: int) -> float:
    """Mean next-byte loss (nats) over consecutive windows of the held-out stream."""
    n = min(max_windows, (ids.numel() - 1) // length)
    x = ids[: n * length + 1]
    inp = x[:-1].view(n, length)
    tgt = x[1:].view(n, length)
    total, count = 0.0, 0
    for i in range(0, n, 16):
        logits = model(input_ids=inp[i:i + 16], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt[i:i + 16].reshape(-1), reduction="sum")
        total += float(loss)
        count += tgt[i:i + 16].numel()
    return total / count


def expert_stats(model, ids: torch.Tensor, sequences: int, length: int, positions: int,
                 seed: int) -> dlb.ExpertStats:
    """Relevance of each expert for predicting the true next byte at several positions."""
    stats = dlb.ExpertStats()
    batch = windows(ids, sequences, length, seed)
    for i in range(0, sequences, 8):
        chunk = batch[i:i + 8]
        with dlb.trace(model) as tape:
            model(input_ids=chunk[:, :-1])
        for p in torch.linspace(length // 4, length - 1, positions).long().tolist():
            exp = tape.explain(target=chunk[:, p + 1].tolist(), position=p, keep=False)
            stats.add(exp)
    return stats


def write_checkpoint(model, plan, out: Path, held: torch.Tensor, masked_loss: float, args,
                     n_params: int) -> dict:
    """Write the smaller checkpoint, reload it and evaluate it on its domain's held-out text."""
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    write_pruned_checkpoint(model, plan, out)
    small = AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, dtype=next(model.parameters()).dtype,
        experts_implementation=model.config._experts_implementation).eval()
    loss = heldout_loss(small, held, args.length, args.eval_windows)
    params = sum(p.numel() for p in small.parameters())
    if not math.isclose(loss, masked_loss, rel_tol=1e-5, abs_tol=1e-6):
        raise SystemExit(f"{out}: the smaller checkpoint's loss {loss} differs from the "
                         f"masked-routing loss {masked_loss}")
    print(f"wrote {out}: {params:,} parameters (was {n_params:,}), loss {loss:.6f}")
    return {"dir": str(out), "params": params, "masked": masked_loss, "loss": loss,
            "bytes": (out / "model.safetensors").stat().st_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/pruning_report.md")
    ap.add_argument("--sequences", type=int, default=48)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--positions", type=int, default=4)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--random-seeds", type=int, default=10)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-checkpoint", metavar="DIR", default=None,
                    help="write each domain's relevance-pruned model (experts removed) to "
                         "DIR/<domain>-<percent>pct and check it against masked routing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, meta = load_tiny_moe()
    model.set_experts_implementation("eager")
    t0 = time.time()
    held = {d: corpus_ids(d, "heldout") for d in DOMAINS}
    base = {d: heldout_loss(model, held[d], args.length, args.eval_windows) for d in DOMAINS}
    rows, checkpoints = [], []
    spread: dict[tuple[str, float], dict[str, float]] = {}  # random: standard errors
    n_params = sum(p.numel() for p in model.parameters())
    for domain in DOMAINS:
        stats = expert_stats(model, corpus_ids(domain, "train"), args.sequences, args.length,
                             args.positions, seed=0)
        layers = list(stats.layers)
        E = stats.layers[layers[0]].relevance.numel()
        for frac in args.fractions:
            plans = {"relevance": stats.least(frac, "relevance"),
                     "frequency": stats.least(frac, "frequency")}
            for name, plan in plans.items():
                with pruned(model, plan):
                    losses = {d: heldout_loss(model, held[d], args.length, args.eval_windows)
                              for d in DOMAINS}
                rows.append((domain, frac, name, losses, plan))
                if args.write_checkpoint and name == "relevance":
                    out = Path(args.write_checkpoint) / f"{domain}-{round(frac * 100)}pct"
                    checkpoints.append(write_checkpoint(model, plan, out, held[domain],
                                                        losses[domain], args, n_params))
            rnd = {d: [] for d in DOMAINS}
            for s in range(args.random_seeds):
                r = random.Random(s)
                plan = {layer: sorted(r.sample(range(E), int(round(frac * E))))
                        for layer in layers}
                with pruned(model, plan):
                    for d in DOMAINS:
                        rnd[d].append(heldout_loss(model, held[d], args.length,
                                                   args.eval_windows))
            rows.append((domain, frac, f"random (mean of {args.random_seeds})",
                         {d: sum(v) / len(v) for d, v in rnd.items()}, None))
            spread[(domain, frac)] = {d: _standard_error(v) for d, v in rnd.items()}
        print(stats)
    lines = [
        "# Expert pruning on the shipped tiny MoE",
        "",
        f"Model: {meta.get('model', 'tiny Qwen3-MoE')} — generated by `scripts/prune_experts.py` "
        f"({time.time() - t0:.0f} s on {args.threads} CPU threads).",
        f"Expert statistics per domain: {args.sequences} random {args.length}-byte windows of "
        f"that domain's training text, {args.positions} target positions each (the true next "
        "byte), default mode. Pruned experts are masked out of routing (top-k picks among the "
        "rest). Held-out loss in nats/byte over "
        f"{args.eval_windows} consecutive {args.length}-byte windows per domain.",
        "",
        "Unpruned held-out loss: " + ", ".join(f"{d} {base[d]:.4f}" for d in DOMAINS),
        "",
        "| stats from | pruned | by | " + " | ".join(f"{d} loss (Δ)" for d in DOMAINS) + " |",
        "|---|---|---|" + "---|" * len(DOMAINS),
    ]
    for domain, frac, name, losses, _plan in rows:
        se = spread.get((domain, frac), {}) if name.startswith("random") else {}
        cells = " | ".join(f"{losses[d]:.4f} ({losses[d] - base[d]:+.4f}"
                           + (f" ± {se[d]:.4f}" if d in se else "") + ")" for d in DOMAINS)
        lines.append(f"| {domain} | {frac:.0%} | {name} | {cells} |")
    lines += ["", "Random pruning: the mean over the seeds, ± its standard error."]
    if checkpoints:
        lines += ["", "## Smaller checkpoints (relevance-based plans, experts removed)", "",
                  f"Unpruned: {n_params:,} parameters.", "",
                  "| checkpoint | parameters | safetensors bytes | masked-routing loss | "
                  "checkpoint loss |", "|---|---|---|---|---|"]
        for c in checkpoints:
            lines.append(f"| `{Path(c['dir']).name}` | {c['params']:,} | {c['bytes']:,} | "
                         f"{c['masked']:.6f} | {c['loss']:.6f} |")
    lines += ["", "## Verdict", ""]
    for domain in DOMAINS:
        for frac in args.fractions:
            sel = {n: l[domain] for d, f, n, l, _ in rows if d == domain and f == frac}
            rel = sel["relevance"]
            others = {n: v for n, v in sel.items() if n != "relevance"}
            lines.append(verdict(domain, frac, rel, others, base[domain]))
    text = "\n".join(lines) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    assert all(math.isfinite(v) for v in base.values())


def _standard_error(values: list[float]) -> float:
    """The standard error of the mean of ``values`` (0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def verdict(domain: str, frac: float, rel: float, others: dict[str, float],
            base: float) -> str:
    """One line per domain and fraction, each baseline named with the comparison it earns:
    relevance-based pruning beats it (a smaller loss increase) or does not."""
    parts = [f"{'**beats**' if rel < v else 'does **not** beat'} {n} ({v - base:+.4f})"
             for n, v in others.items()]
    return (f"- {domain}, {frac:.0%}: relevance-based pruning (+{rel - base:.4f}) "
            + "; ".join(parts) + f", on the {domain} held-out loss.")


if __name__ == "__main__":
    main()
