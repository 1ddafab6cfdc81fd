"""Train the tiny byte-level MoE language model shipped in dlbhooks/assets/tiny_moe/ (offline,
CPU). Writes config.json, model.safetensors (float32) and corpus_meta.json (corpus, settings,
measured losses). See docs/tiny_moe.md.

    python scripts/train_tiny_moe.py --minutes 8          # wall-time budget (whole script)
    python scripts/train_tiny_moe.py --steps 1500         # fixed step count: a deterministic run

With ``--minutes`` the cosine schedule runs on elapsed time, so the step count (recorded in
corpus_meta.json) depends on the machine's load; ``--steps`` replaces the time budget.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from dlbhooks.tiny_moe import (
    BOS,
    DOMAINS,
    EOS,
    PAD,
    VOCAB_SIZE,
    corpus_ids,
    decode,
    documents,
    encode,
    fingerprint,
)

OUT = Path(__file__).resolve().parents[1] / "dlbhooks" / "assets" / "tiny_moe"
PROMPTS = {"code": "def ", "prose": "The "}


def make_config(context: int) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE, hidden_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=256,  # dense MLP size, unused (every layer is sparse)
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
        output_router_logits=False, router_aux_loss_coef=0.01,
        max_position_embeddings=context, tie_word_embeddings=True,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, use_cache=True,
        dtype="float32",
    )


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss of every MoE layer, summed over layers:
    experts * sum_e(fraction of top-k picks to e * mean router probability of e), which is
    ``top_k`` per layer when balanced. (transformers' ``load_balancing_loss_func`` pools the
    layers together, which lets single layers collapse onto a few experts.)"""
    total = 0.0
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        experts = probs.shape[-1]
        picks = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, experts)
        frac = picks.sum(dim=(0, 1)).float() / probs.shape[0]
        total = total + experts * (frac * probs.mean(dim=0)).sum()
    return total


def sample_batch(streams: dict[str, torch.Tensor], batch: int, context: int,
                 gen: torch.Generator) -> torch.Tensor:
    """[batch, context + 1] random windows, half from each domain."""
    rows = []
    for k, domain in enumerate(DOMAINS):
        s = streams[domain]
        n = batch // len(DOMAINS) + (k < batch % len(DOMAINS))
        starts = torch.randint(0, len(s) - context - 1, (n,), generator=gen)
        rows.append(torch.stack([s[i:i + context + 1] for i in starts.tolist()]))
    return torch.cat(rows)


def windows(stream: torch.Tensor, context: int, limit: int | None = None) -> torch.Tensor:
    """[n, context + 1] windows whose targets tile the stream; with ``limit``, at most that many
    of them, evenly spaced."""
    n = (len(stream) - 1) // context
    starts = torch.arange(n) * context
    if limit is not None and n > limit:
        starts = starts[torch.linspace(0, n - 1, limit).long()]
    return stream[starts[:, None] + torch.arange(context + 1)[None]]


@torch.no_grad()
def evaluate(model: Qwen3MoeForCausalLM, wins: torch.Tensor, batch: int = 64,
             usage: torch.Tensor | None = None) -> float:
    """Mean next-token loss in nats per byte over byte targets (specials are context only).
    Adds top-k expert counts per layer into ``usage`` [layers, experts] when given."""
    total, count = 0.0, 0
    for i in range(0, len(wins), batch):
        w = wins[i:i + batch]
        out = model(input_ids=w[:, :-1], output_router_logits=usage is not None)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        tgt = w[:, 1:]
        nll = -logp.gather(-1, tgt[..., None])[..., 0]
        mask = tgt < 256
        total += float(nll[mask].sum())
        count += int(mask.sum())
        if usage is not None:
            k = model.config.num_experts_per_tok
            for layer, logits in enumerate(out.router_logits):
                top = logits.topk(k, dim=-1).indices.reshape(-1)
                usage[layer] += torch.bincount(top, minlength=usage.shape[1]).to(usage.dtype)
    return total / max(count, 1)


def unigram(train: torch.Tensor, heldout: torch.Tensor) -> tuple[float, float]:
    """Entropy (nats) of the training split's byte distribution, and the cross-entropy of the
    held-out bytes under it (add-one smoothed)."""
    counts = torch.bincount(train[train < 256], minlength=256).double()
    p = counts / counts.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    q = (counts + 1) / (counts.sum() + 256)
    held = heldout[heldout < 256]
    return entropy, float(-q[held].log().mean())


def generate(model: Qwen3MoeForCausalLM, prompt: str, new: int) -> str:
    ids = encode(prompt, bos=True)[None]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                         do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    return decode(out[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=8.0, help="wall-time budget, whole script")
    ap.add_argument("--steps", type=int, default=None, help="fixed step count (no time budget)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 is faster than 2 when the cores are shared)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    T = args.context

    streams = {s: {d: corpus_ids(d, s) for d in DOMAINS} for s in ("train", "heldout")}
    train = streams["train"]
    held_wins = {d: windows(streams["heldout"][d], T) for d in DOMAINS}
    train_wins = {d: windows(train[d], T, limit=512) for d in DOMAINS}
    probe = {d: held_wins[d][:: max(1, len(held_wins[d]) // 16)][:16] for d in DOMAINS}
    eval_windows = sum(len(w) for w in [*held_wins.values(), *train_wins.values()])

    config = make_config(T)
    model = Qwen3MoeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"corpus ready in {time.time() - t0:.1f}s; {n_params:,} parameters, experts "
          f"implementation {model.config._experts_implementation!r}")
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))

    budget = args.minutes * 60.0
    deadline = None  # set after the first steps, from a measured step time
    log, step, step_time, losses, t_train = [], 0, None, [], time.time()
    next_log = 0.0
    while True:
        if args.steps is not None:
            progress = step / args.steps
        elif deadline is None:
            progress = 0.0
        else:
            progress = (time.time() - t_train) / (deadline - t_train)
        if progress >= 1.0:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * \
            (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        x = sample_batch(train, args.batch, T, gen)
        out = model(input_ids=x[:, :-1], output_router_logits=True)
        lm_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, VOCAB_SIZE),
                                                    x[:, 1:].reshape(-1))
        aux_loss = balance_loss(out.router_logits, config.num_experts_per_tok)
        opt.zero_grad(set_to_none=True)
        (lm_loss + config.router_aux_loss_coef * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        losses.append((lm_loss.item(), aux_loss.item() / config.num_hidden_layers))
        if step == 10 and args.steps is None:
            # forward-only evaluation of a window costs ~1/5 of training on it (measured)
            step_time = (time.time() - t_train) / step
            reserve = 0.3 * step_time * eval_windows / args.batch + 20.0
            deadline = t0 + budget - reserve
            print(f"{step_time:.2f}s/step; training until {deadline - t0:.0f}s "
                  f"(reserve {reserve:.0f}s for evaluation)")
        if progress >= next_log or (args.steps is not None and step == args.steps):
            model.eval()
            probe_loss = {d: round(evaluate(model, probe[d]), 4) for d in DOMAINS}
            lm, aux = (sum(v) / len(losses) for v in zip(*losses))
            log.append({"step": step, "seconds": round(time.time() - t0, 1), "lr": lr,
                        "train_lm_loss": round(lm, 4), "aux_loss": round(aux, 4),
                        "heldout_probe": probe_loss})
            print(json.dumps(log[-1]))
            losses = []
            next_log += 0.1
    train_seconds = time.time() - t_train

    model.eval()
    layers, experts = config.num_hidden_layers, config.num_experts
    usage = torch.zeros(layers, experts, dtype=torch.float64)
    results = {}
    for d in DOMAINS:
        h, ce = unigram(train[d], streams["heldout"][d])
        results[d] = {
            "heldout_loss": round(evaluate(model, held_wins[d], usage=usage), 4),
            "train_loss": round(evaluate(model, train_wins[d]), 4),
            "unigram_entropy_train": round(h, 4),
            "unigram_crossentropy_heldout": round(ce, 4),
        }
        results[d]["heldout_bits_per_byte"] = round(results[d]["heldout_loss"] / math.log(2), 4)
        print(d, results[d])
    usage = usage / usage.sum(dim=1, keepdim=True)
    samples = {d: generate(model, p, 120) for d, p in PROMPTS.items()}
    for d, s in samples.items():
        print(f"--- greedy sample ({d}) ---\n{s}")

    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (args.out / name).unlink(missing_ok=True)
    model.save_pretrained(args.out)
    (args.out / "generation_config.json").unlink(missing_ok=True)  # config.json has the ids
    (args.out / "model.safetensors").chmod(0o644)
    corpus = {}
    for d in DOMAINS:
        corpus[d] = {}
        for s in ("train", "heldout"):
            docs = documents(d, s)
            corpus[d][s] = {"documents": len(docs), "tokens": len(streams[s][d]),
                            "bytes": sum(len(b) for _, b in docs),
                            "first": docs[0][0], "last": docs[-1][0],
                            "sha256": fingerprint(streams[s][d])}
    meta = {
        "model": "Qwen3MoeForCausalLM (byte-level)",
        "parameters": n_params,
        "vocabulary": {"bytes": 256, "bos": BOS, "eos": EOS, "pad": PAD,
                       "vocab_size": VOCAB_SIZE},
        "corpus": corpus,
        "corpus_sources": {
            "code": "*.py under os.path.dirname(os.__file__), sorted by relative path, "
                    "skipping test/tests/idle_test/site-packages/pydoc_data folders; every "
                    "k-th file kept so the total stays under 4 MB",
            "prose": "pydoc_data.topics.topics values, sorted by key",
            "heldout": "the shortest tail of the sorted documents holding >= 5% of the bytes",
            "stream": "each document as <bos> UTF-8 bytes <eos>, concatenated",
        },
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__},
        "training": {
            "steps": step, "train_seconds": round(train_seconds, 1),
            "tokens_seen": step * args.batch * (T + 1), "batch": args.batch,
            "batch_mix": "half code, half prose windows (uniform random starts)",
            "context": T, "optimizer": "AdamW betas (0.9, 0.95), grad clip 1.0",
            "lr": args.lr, "warmup_steps": args.warmup,
            "schedule": "cosine to 0.1 x lr over " +
                        (f"{args.steps} steps" if args.steps else
                         f"elapsed time (--minutes {args.minutes})"),
            "weight_decay": args.weight_decay, "seed": args.seed, "threads": args.threads,
            "loss": "next-byte cross-entropy + router_aux_loss_coef x Switch load-balancing loss "
                    "of each MoE layer, summed over layers (aux_loss in the log: per layer, "
                    "balanced = num_experts_per_tok)",
            "experts_implementation": model.config._experts_implementation,
        },
        "evaluation": "mean next-byte loss (nats/byte) over byte targets; windows of "
                      f"{T} targets tiling the split; train_loss on "
                      f"{len(train_wins['code'])} evenly spaced windows of the train split",
        "results": results,
        "expert_usage_heldout": [[round(float(v), 4) for v in row] for row in usage],
        "log": log,
        "samples_greedy": samples,
        "total_seconds": round(time.time() - t0, 1),
    }
    (args.out / "corpus_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 2**20:.2f} MiB) in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
