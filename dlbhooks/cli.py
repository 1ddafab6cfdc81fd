"""The dlbhooks command line: ``dlbhooks demo`` explains a model that ships with the package
(the tiny MoE language model by default, ``--model digits`` the digits CNN; no network),
``dlbhooks explain`` a checkpoint directory on disk (``dlbhooks report`` renders a saved
result), ``dlbhooks experts`` gathers expert statistics of an MoE checkpoint over text and
``dlbhooks prune`` writes a smaller checkpoint without its least important experts."""

from __future__ import annotations

import argparse
import sys
import textwrap

import torch

import dlbhooks as dlb
from dlbhooks.demo import load_digits_model
from dlbhooks.experts_cli import (
    EXPERTS_DESCRIPTION,
    PRUNE_DESCRIPTION,
    add_experts_arguments,
    add_prune_arguments,
    experts_command,
    prune_command,
)
from dlbhooks.explain_cli import (
    add_explain_arguments,
    add_report_arguments,
    explain_command,
    report_command,
)
from dlbhooks.tiny_moe import decode, encode, load_tiny_moe

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
    if args.model == "moe":
        if args.samples is not None:
            raise SystemExit("dlbhooks demo: --samples applies to --model digits (the MoE demo "
                             "explains the next byte after --prompt)")
        return demo_moe(args)
    return demo_digits(args)


def _totals_line(exp) -> str:
    """Where the seeded relevance went: per stream in contrastive mode."""
    if exp.positive is None:
        return (f"inputs {exp.total_input:.3f} + absorbed {exp.total_absorbed:.3f} "
                f"= seeded {exp.ledger[0].relevance_out:.1f}")
    parts = []
    for sign, inputs, absorbed, seeded in (
            ("+", exp.positive, exp.absorbed_positive, exp.ledger[0].relevance_out[0]),
            ("-", exp.negative, exp.absorbed_negative, exp.ledger[0].relevance_out[1])):
        total = sum(float(t.double().sum()) for t in inputs.values())
        parts.append(f"{sign} stream: inputs {total:.3f} + absorbed "
                     f"{sum(absorbed.values()):.3f} = seeded {seeded:.1f}")
    return "; ".join(parts)


def demo_moe(args: argparse.Namespace) -> int:
    """Explain the shipped tiny MoE's next byte after a code prompt: relevance per prompt
    byte and per expert."""
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
    for n, (layer, t) in enumerate(sorted(exp.experts.items())):
        if n == 0:
            names = exp.expert_columns(layer)
            print(f"  {'layer / expert':<22} " + " ".join(f"{c:>6}" for c in names))
        cells = " ".join(f"{v:6.2f}" for v in t[0].sum(0).tolist())
        print(f"  {layer:<22} {cells}")
    print("\n" + _totals_line(exp))
    return 0


def demo_digits(args: argparse.Namespace) -> int:
    model, images, labels, meta = load_digits_model()
    print(f"dlbhooks {dlb.__version__} demo: a CNN trained on {meta['dataset']}")
    print(f"held-out accuracy {meta['test_accuracy']:.1%} ({meta['test_size']} images)\n")
    print(dlb.coverage(model), "\n")
    n = 3 if args.samples is None else args.samples
    picks = list(range(0, len(labels), max(1, len(labels) // n)))[:n]
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
        share = exp.total_absorbed / seeded
        if share > 0.25:
            print()
            note = (f"{share:.0%} of the relevance was absorbed by bias shares (METHOD.md §2: a "
                    "unit's bias keeps |b|/T of its relevance). On images with a blank "
                    "background many first-layer units see little input, so their biases "
                    "explain much of their activation; the rest reached the pixels. "
                    "Contrastive mode (--mode contrastive) has no bias sink.")
            print(textwrap.fill(note, width=92))
    else:
        print("  " + _totals_line(exp))
    return 0


# What --help prints (plain text: argparse shows it as written, reflowed).
DESCRIPTION = (
    "Explain PyTorch models with the DLBacktrace method. 'dlbhooks demo' explains a model "
    "that ships with dlbhooks, without network access: by default the tiny byte-level "
    "mixture-of-experts language model (the next byte after a code prompt, per prompt byte "
    "and per expert), with '--model digits' a CNN on 8x8 digit images. 'dlbhooks explain' "
    "explains a checkpoint on disk; 'dlbhooks experts' and 'dlbhooks prune' find the experts "
    "a domain relies on and remove the rest.")
DEMO_DESCRIPTION = (
    "Explain a model that ships with dlbhooks (no network). --model moe (default): the tiny "
    "byte-level mixture-of-experts language model predicts the next byte after --prompt; "
    "the demo prints the relevance of each prompt byte and of each expert. --model digits: "
    "a CNN trained on scikit-learn's 8x8 digits explains --samples held-out images and "
    "prints the relevance as text heatmaps.")
def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dlbhooks", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="explain a small model that ships with dlbhooks "
                       "(default: the tiny MoE language model)", description=DEMO_DESCRIPTION)
    p.add_argument("--model", choices=["moe", "digits"], default="moe",
                   help="moe: the tiny byte-level MoE language model (default); digits: the "
                        "digits CNN")
    p.add_argument("--prompt", default="def __init__(self",
                   help="moe: the text whose next byte is explained (default: %(default)r)")
    p.add_argument("--mode", choices=["default", "contrastive"], default="default",
                   help="the method's mode (default: default)")
    p.add_argument("--samples", type=_positive, default=None,
                   help="digits: how many held-out images to explain (default: 3)")
    p.set_defaults(func=demo)
    p = sub.add_parser("explain", help="explain a prediction of a checkpoint directory on "
                       "disk: a summary, an HTML report (--out), a saved result (--save)")
    add_explain_arguments(p)
    p.set_defaults(func=explain_command)
    p = sub.add_parser("report", help="render a saved result as an HTML report")
    add_report_arguments(p)
    p.set_defaults(func=report_command)
    p = sub.add_parser("experts", help="expert statistics of an MoE checkpoint over your "
                       "text, on one or several processes", description=EXPERTS_DESCRIPTION)
    add_experts_arguments(p)
    p.set_defaults(func=experts_command)
    p = sub.add_parser("prune", help="a smaller MoE checkpoint without its least important "
                       "experts, and a held-out evaluation", description=PRUNE_DESCRIPTION)
    add_prune_arguments(p)
    p.set_defaults(func=prune_command)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
