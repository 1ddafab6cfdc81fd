"""Self-contained HTML reports of explanations (no network, no CDN: one file that opens
offline): ``Explanation.to_html()`` and notebooks' ``_repr_html_``.

A report shows what was explained (mode, target, totals), the relevance of each input —
tokens coloured by signed relevance with the value on hover, or a bar per feature — both
streams in contrastive mode, relevance per layer, per attention head (layer × head), per
expert (layer × expert) next to routing frequency, and the ledger: what was seeded, what
reached the inputs, where the rest was absorbed.
"""

from __future__ import annotations

import base64
import html
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .plot import plot_png

if TYPE_CHECKING:
    from .results import Explanation

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;
max-width:1100px}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid
#ddd;padding-bottom:4px} .meta{color:#555;font-size:13px}
.tok{display:inline-block;padding:2px 4px;margin:2px 1px;border-radius:3px;font-family:ui-monospace,
Menlo,Consolas,monospace;font-size:14px;white-space:pre}
.row{margin:6px 0} .label{font-size:12px;color:#555;margin-right:8px}
table{border-collapse:collapse;font-size:12px} td,th{padding:2px 6px;text-align:right}
th{color:#555;font-weight:600} td.name{text-align:left;font-family:ui-monospace,Menlo,monospace}
.bar{display:inline-block;height:10px;vertical-align:middle}
.heat td.c{width:22px;height:18px;padding:0}
.legend{font-size:12px;color:#555}
"""


def _color(v: float, scale: float) -> str:
    """Red for positive, blue for negative relevance, white at 0 (signed, centred); grey
    for no value (NaN: a context position after the generated token)."""
    if math.isnan(v):
        return "rgb(238,238,238)"
    x = 0.0 if scale <= 0 else max(-1.0, min(1.0, v / scale))
    if x >= 0:
        g = int(255 - 200 * x)
        return f"rgb(255,{g},{g})"
    g = int(255 + 200 * x)
    return f"rgb({g},{g},255)"


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def _tokens_html(values: Tensor, tokens: list[str] | None, label: str) -> str:
    vals = values.double().tolist()
    scale = max((abs(v) for v in vals), default=0.0)
    names = [_visible(t) for t in tokens] if tokens is not None and len(tokens) == len(vals) \
        else [f"#{i}" for i in range(len(vals))]
    cells = "".join(
        f'<span class="tok" style="background:{_color(v, scale)}" '
        f'title="{html.escape(n)}: {_fmt(v)}">{html.escape(n)}</span>'
        for n, v in zip(names, vals))
    return f'<div class="row"><span class="label">{html.escape(label)}</span>{cells}</div>'


def _visible(token: str) -> str:
    """A token as shown: line breaks and tabs as visible marks; spaces stay, unless the
    token is only spaces (then each is ␣)."""
    if token and not token.strip(" "):
        return "␣" * len(token)
    return token.replace("\n", "⏎").replace("\t", "→") or "∅"


def _bars(items: list[tuple[str, float]], title: str) -> str:
    if not items:
        return ""
    scale = max(abs(v) for _, v in items) or 1.0
    rows = "".join(
        f'<tr><td class="name">{html.escape(k)}</td><td>{_fmt(v)}</td><td style="text-align:'
        f'left"><span class="bar" style="width:{int(200 * abs(v) / scale)}px;background:'
        f'{"#d62728" if v >= 0 else "#1f77b4"}"></span></td></tr>' for k, v in items)
    return f"<h2>{html.escape(title)}</h2><table>{rows}</table>"


def _heatmap(rows: list[str], matrix: list[list[float]], cols: list[str], title: str,
             note: str = "") -> str:
    flat = [abs(v) for r in matrix for v in r if not math.isnan(v)]
    scale = max(flat, default=0.0)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        f'<tr><td class="name">{html.escape(r)}</td>' + "".join(
            f'<td class="c" style="background:{_color(v, scale)}" title="{html.escape(r)}, '
            f'{html.escape(c)}: {_fmt(v)}"></td>' for c, v in zip(cols, vals)) + "</tr>"
        for r, vals in zip(rows, matrix))
    legend = f'<div class="legend">{html.escape(note)}</div>' if note else ""
    return (f'<h2>{html.escape(title)}</h2>{legend}<table class="heat"><tr><th></th>{head}'
            f"</tr>{body}</table>")


def _input_section(exp: Explanation, tokens: list[list[str]] | None, row: int,
                   image: Any = None) -> str:
    parts = []
    for name, t in exp.inputs.items():
        if t.dim() == 0 or (len(exp.inputs) > 1 and not bool(t.abs().sum() > 0)):
            continue  # (an input no relevance reached, e.g. an attention mask)
        r = t[row] if t.shape[0] > row else t[0]
        streams = [("relevance", r)]
        if exp.positive is not None and exp.negative is not None:
            streams += [("+ stream", exp.positive[name][row]), ("− stream",
                                                                exp.negative[name][row])]
        toks = tokens[row] if tokens is not None and row < len(tokens) else None
        if r.dim() == 1 and (toks is not None or "ids" in name):
            body = "".join(_tokens_html(v, toks, label) for label, v in streams)
            parts.append(f"<h2>Input {html.escape(name)} (row {row})</h2>{body}")
        elif r.dim() == 1:
            items = [(f"{name}[{i}]", float(v)) for i, v in enumerate(r.double().tolist())]
            items.sort(key=lambda kv: -abs(kv[1]))
            parts.append(_bars(items[:40], f"Input {name} (row {row}): features by |relevance|"))
        elif r.dim() in (2, 3):  # an image: [H, W] or [C, H, W], relevance summed over C
            png = plot_png(exp, name, row, None if image is None else image[row]
                           if image.dim() == r.dim() + 1 else image)
            body = "" if png is None else (
                '<div class="row"><img alt="relevance heatmap" src="data:image/png;base64,'
                f'{base64.b64encode(png).decode()}"></div>')
            body += "".join(_image_html(v, label) for label, v in streams)
            parts.append(f"<h2>Input {html.escape(name)} (row {row}): pixel relevance, summed "
                         f"over channels</h2>{body}")
        else:
            per = r.double().reshape(r.shape[0], -1).sum(-1)
            items = [(f"{name}[{i}]", float(v)) for i, v in enumerate(per.tolist())]
            parts.append(_bars(items[:64], f"Input {name} (row {row}): summed per first axis"))
    return "".join(parts)


def _image_html(r: Tensor, label: str, side: int = 64) -> str:
    """A signed heatmap of an image's relevance as a grid of cells (at most ``side`` per
    axis: larger images are average-pooled), values on hover."""
    img = r.double().sum(0) if r.dim() == 3 else r.double()
    H, W = img.shape
    if H > side or W > side:
        img = torch.nn.functional.adaptive_avg_pool2d(img[None, None], (min(H, side),
                                                                      min(W, side)))[0, 0]
    scale = float(img.abs().max())
    cell = max(4, min(24, 384 // max(img.shape)))
    rows = "".join(
        "<tr>" + "".join(f'<td style="width:{cell}px;height:{cell}px;padding:0;background:'
                         f'{_color(v, scale)}" title="({i}, {j}): {_fmt(v)}"></td>'
                         for j, v in enumerate(vals)) + "</tr>"
        for i, vals in enumerate(img.tolist()))
    return (f'<div class="row"><span class="label">{html.escape(label)}</span>'
            f'<table style="border-collapse:collapse;display:inline-table">{rows}</table>'
            "</div>")


def _heads_section(exp: Explanation, row: int) -> str:
    if not exp.heads:
        return ""
    names = list(exp.heads)
    mats = [t[row].double().tolist() if t.dim() > 1 else t.double().tolist()
            for t in exp.heads.values()]
    width = max(len(m) for m in mats)
    mats = [m + [math.nan] * (width - len(m)) for m in mats]
    return _heatmap(names, mats, [str(h) for h in range(width)],
                    "Relevance per attention head (layer × head)")


def _experts_section(exp: Explanation, row: int, tokens: list[str] | None = None) -> str:
    if not exp.experts:
        return ""
    blocks = list(exp.experts)
    rel = []
    freq = []
    cols: list[str] = exp.expert_columns(blocks[0])
    for b in blocks:
        t = exp.experts[b]
        r = t[row] if t.shape[0] > row else t[0]
        rel.append(r.double().reshape(-1, r.shape[-1]).sum(0).tolist())
        if b in exp.routing:
            idx = exp.routing[b][0]
            idx = idx[row] if idx.shape[0] > row else idx[0]
            counts = torch.bincount(idx.reshape(-1).long(), minlength=r.shape[-1])
            freq.append((counts.double() / max(1, idx.shape[0])).tolist()[: r.shape[-1]])
        else:
            freq.append([math.nan] * r.shape[-1])
    out = _heatmap(blocks, rel, cols, "Relevance per expert (layer × expert)",
                   "summed over the row's tokens; hover for values")
    out += _heatmap(blocks, freq, cols, "Routing frequency (layer × expert)",
                    "share of the row's tokens routed to each expert")
    out += "<h2>Token × expert, per layer</h2>"
    for b in blocks:  # one table per layer, opened on click (no script)
        t = exp.experts[b]
        r = (t[row] if t.shape[0] > row else t[0]).double().reshape(-1, t.shape[-1])
        names = [_visible(x) for x in tokens] if tokens is not None and \
            len(tokens) == r.shape[0] else [f"#{i}" for i in range(r.shape[0])]
        grid = _heatmap(names, r.tolist(), cols, b)
        out += f"<details><summary>{html.escape(b)}</summary>{grid}</details>"
    return out


def _ledger_section(exp: Explanation) -> str:
    seeded = exp.ledger[0].relevance_out if exp.ledger else None
    rows = []
    if seeded is not None:
        rows.append(("seeded", seeded))
    rows.append(("reached the inputs", exp.total_input))
    rows.append(("absorbed", exp.total_absorbed))
    rows.append(("conservation error (of the seed)", exp.conservation_error()))
    body = "".join(f'<tr><td class="name">{html.escape(k)}</td><td>{_cell(v)}</td></tr>'
                   for k, v in rows)
    top = sorted(exp.absorbed.items(), key=lambda kv: -abs(kv[1]))[:15]
    return (f"<h2>Ledger</h2><table>{body}</table>"
            + _bars([(k, v) for k, v in top if v], "Where relevance was absorbed (top 15)"))


def _cell(v: Any) -> str:
    if isinstance(v, tuple):
        return " / ".join(_fmt(x) for x in v) + " (+ / −)"
    return _fmt(float(v))


def explanation_html(exp: Explanation, tokens: Any = None, *, row: int = 0,
                     title: str | None = None, image: Any = None) -> str:
    """One self-contained HTML page for ``exp`` (batch row ``row``). ``tokens``: the token
    strings of the text input, for one row (a list of strings) or per row (a list of
    lists), e.g. ``tokenizer.convert_ids_to_tokens(ids[0])``. ``image``: the input image
    (batch or one), drawn under the heatmap the report embeds as PNG (with matplotlib)."""
    toks = _tokens(tokens)
    head = (f"<h1>{html.escape(title or 'dlbhooks explanation')}</h1>"
            f'<div class="meta">mode {html.escape(exp.mode)} · target '
            f"{html.escape(str(exp.target))[:200]} · multiplier {exp.multiplier:g}"
            f"{' · position ' + html.escape(str(exp.info.get('position'))) if 'position' in exp.info else ''}"  # noqa: E501
            "</div>")
    legend = ('<div class="legend">red: positive relevance, blue: negative; hover a cell for '
              "its value</div>")
    layers = _bars(list(exp.layers.items())[:60], "Relevance per layer (output → input)")
    body = (head + legend + _input_section(exp, toks, row, image) + _ledger_section(exp)
            + _heads_section(exp, row)
            + _experts_section(exp, row, toks[row] if toks is not None and row < len(toks)
                               else None) + layers)
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>"
            f"{html.escape(title or 'dlbhooks explanation')}</title><style>{_STYLE}</style>"
            f"</head><body>{body}</body></html>")


def _tokens(tokens: Any) -> list[list[str]] | None:
    if tokens is None:
        return None
    if isinstance(tokens, list) and tokens and isinstance(tokens[0], str):
        return [tokens]
    if isinstance(tokens, list):
        return [list(t) for t in tokens]
    raise TypeError("tokens: a list of strings, or a list of lists of strings, per row")


def generation_html(gen: Any, *, title: str | None = None) -> str:
    """One self-contained page for a :class:`~dlbhooks.GenerationExplanation`: the matrix of
    generated tokens × context tokens, then each generated token's map (click to open; no
    script: ``<details>`` elements)."""
    T, n = gen.prompt_length, gen.n
    ids = gen.ids.tolist()
    tokens = [_visible(t) for t in gen.tokens] if gen.tokens is not None else \
        [f"#{i}" for i in ids]
    matrix = gen.matrix.double()
    cols = tokens[: T + n - 1]
    rows = [f"{k}: {tokens[T + k]}" for k in range(n)]
    grid = [[float(matrix[k, j]) if j < T + k else math.nan for j in range(T + n - 1)]
            for k in range(n)]
    head = (f"<h1>{html.escape(title or 'dlbhooks: a generation explained')}</h1>"
            f'<div class="meta">mode {html.escape(gen.mode)} · {n} generated token(s) · '
            f"multiplier {gen.multiplier:g} · conservation error "
            f"{gen.conservation_error():.2g}</div>"
            '<div class="legend">red: positive relevance, blue: negative; hover a cell for '
            "its value; open a generated token for its map</div>")
    prompt = "".join(f'<span class="tok">{html.escape(t)}</span>' for t in tokens[:T])
    out = [head, f'<h2>Prompt</h2><div class="row">{prompt}</div>',
           _heatmap(rows, grid, cols, "Generated token × context token")]
    out.append("<h2>Each generated token's map</h2>")
    for k in range(n):
        if math.isnan(float(gen.absorbed[k])):
            continue  # (left unexplained)
        ctx = tokens[: T + k]
        body = _tokens_html(matrix[k, : T + k], ctx, "relevance")
        if gen.positive is not None and gen.negative is not None:
            body += _tokens_html(gen.positive[k, : T + k], ctx, "+ stream")
            body += _tokens_html(gen.negative[k, : T + k], ctx, "− stream")
        out.append(f"<details><summary>{html.escape(rows[k])} (absorbed "
                   f"{float(gen.absorbed[k]):.4g})</summary>{body}</details>")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>"
            f"{html.escape(title or 'dlbhooks generation')}</title><style>{_STYLE}"
            "details{margin:4px 0} summary{cursor:pointer;font-family:ui-monospace,"
            f"Menlo,monospace;font-size:13px}}</style></head><body>{''.join(out)}</body></html>")

