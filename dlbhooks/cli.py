"""Command line: ``dlbhooks demo`` explains the shipped digits CNN (no network)."""

from __future__ import annotations

import argparse
import sys

import torch

SHADES = " .:-=+*#%@"


def _heatmap(rel: torch.Tensor) -> list[str]:
    """8×8 relevance as text: positive with shades, negative with 'o'."""
    peak = float(rel.abs().max()) or 1.0
    rows = []
    for row in rel:
        cells = []
        for v in row.tolist():
            level = int(round(abs(v) / peak * (len(SHADES) - 1)))
            cells.append(("o" if v < 0 and level else SHADES[level]) * 2)
        rows.append("".join(cells))
    return rows


def demo(args: argparse.Namespace) -> int:
    return demo_moe(args) if args.model == "moe" else demo_digits(args)


def demo_moe(args: argparse.Namespace) -> int:
    """Explain the shipped tiny MoE's next byte after a code prompt: relevance per prompt
    byte and per expert."""
    import dlbhooks as dlb
    from dlbhooks.tiny_moe import decode, encode, load_tiny_moe

    model, meta = load_tiny_moe()
    res = meta["results"]
    print(f"dlbhooks {dlb.__version__} demo: {meta['model']}, {meta['parameters']:,} parameters,")
    print("trained on the standard library's sources (code) and pydoc topics (prose); held-out "
          + ", ".join(f"{d} {r['heldout_loss']:.2f} nats/byte (unigram "
                      f"{r['unigram_crossentropy_heldout']:.2f})" for d, r in res.items()))
    ids = encode(args.prompt, bos=True)[None]
    with dlb.trace(model) as tape:
        logits = model(input_ids=ids).logits
    nxt = int(logits[0, -1].argmax())
    exp = tape.explain(mode=args.mode)
    print(f"\nprompt {args.prompt!r} -> next byte {decode([nxt])!r} "
          f"(p={float(logits[0, -1].softmax(-1)[nxt]):.2f}), {args.mode} mode\n")
    rel = exp.inputs["input_ids"][0]
    peak = float(rel.abs().max()) or 1.0
    for i, r in zip(ids[0].tolist(), rel.tolist()):
        tok = decode([i], specials=True)
        bar = ("+" if r >= 0 else "-") * int(round(abs(r) / peak * 30))
        print(f"  {tok!r:>10} {r:8.3f} {bar}")
    print("\nrelevance per expert (summed over tokens):")
    for layer, t in sorted(exp.experts.items()):
        cells = " ".join(f"{v:6.2f}" for v in t[0].sum(0).tolist())
        print(f"  {layer:<22} {cells}")
    print(f"\ninputs {exp.total_input:.3f} + absorbed {exp.total_absorbed:.3f} "
          f"= seeded {exp.ledger[0].relevance_out if args.mode == 'default' else '(per stream)'}")
    return 0


def demo_digits(args: argparse.Namespace) -> int:
    import dlbhooks as dlb
    from dlbhooks.demo import load_digits_model

    model, images, labels, meta = load_digits_model()
    print(f"dlbhooks {dlb.__version__} demo: a CNN trained on {meta['dataset']}")
    print(f"held-out accuracy {meta['test_accuracy']:.1%} ({meta['test_size']} images)\n")
    print(dlb.coverage(model), "\n")
    picks = list(range(0, len(labels), max(1, len(labels) // args.samples)))[: args.samples]
    x = images[picks]
    with dlb.trace(model) as tape:
        logits = model(x)
    exp = tape.explain(mode=args.mode, multiplier=100.0)
    pred = logits.argmax(-1)
    for i, (img_rel, lab, p) in enumerate(zip(exp.inputs["image"], labels[picks], pred)):
        total = float(img_rel.sum())
        print(f"sample {picks[i]}: label {int(lab)}, predicted {int(p)}; "
              f"input relevance {total:.2f} of 100 ({args.mode})")
        img = _heatmap(x[i, 0] - 0.0)
        rel = _heatmap(img_rel[0])
        print("  image            relevance")
        for a, b in zip(img, rel):
            print(f"  {a} {b}")
        print()
    print("where the relevance went (summed over the batch):")
    for key, absorbed in exp.absorbed.items():
        if absorbed:
            print(f"  {key:<14} absorbed {absorbed:10.3f}  ({dict(tape.model.named_modules())[key.split('#')[0]].__class__.__name__})")  # noqa: E501
    seeded = 100.0 * len(picks)
    print(f"  inputs         received {exp.total_input:10.3f}")
    if args.mode == "default":
        print(f"  total          {exp.total_input + exp.total_absorbed:.6f} = seeded {seeded:.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlbhooks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="explain a small model that ships with dlbhooks")
    p.add_argument("--model", choices=["moe", "digits"], default="moe",
                   help="the tiny byte-level MoE LM (default) or the digits CNN")
    p.add_argument("--prompt", default="def __init__(self")
    p.add_argument("--mode", choices=["default", "contrastive"], default="default")
    p.add_argument("--samples", type=int, default=3)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
