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
    p = sub.add_parser("demo", help="explain the digits CNN that ships with dlbhooks")
    p.add_argument("--mode", choices=["default", "contrastive"], default="default")
    p.add_argument("--samples", type=int, default=3)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
