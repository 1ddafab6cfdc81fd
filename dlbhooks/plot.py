"""``Explanation.plot()``: a matplotlib figure of an input's relevance (the optional extra
``dlbhooks[plot]``): a signed heatmap over an image, bars for tabular features or tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .results import Explanation


def plot_explanation(exp: Explanation, input: str | None = None, *, row: int = 0,  # noqa: A002
                     tokens: list[str] | None = None, ax: Any = None, top: int = 30,
                     image: Any = None) -> Any:
    """Draw input ``input``'s relevance (default: the first input relevance reached) for
    batch row ``row`` on ``ax`` (a new figure if ``None``) and return the axes. Images
    (``[C, H, W]`` or ``[H, W]``): relevance summed over channels, a red–blue map centred at
    0, drawn over ``image`` (the input, ``[C, H, W]`` or ``[H, W]``, in grey) when given.
    One-dimensional inputs: a bar per feature (or token, with ``tokens``), the ``top``
    largest by |relevance| for long ones."""
    try:
        import matplotlib.pyplot as plt  # lazy: optional dependency
    except ImportError:
        raise ImportError("Explanation.plot needs matplotlib: pip install 'dlbhooks[plot]'"
                          ) from None
    name = input or next((k for k, v in exp.inputs.items() if bool(v.abs().sum() > 0)),
                         next(iter(exp.inputs)))
    r = exp.inputs[name]
    r = (r[row] if r.dim() > 1 else r).double().cpu()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4.5) if r.dim() >= 2 else (8, 3.5))
    if r.dim() in (2, 3):
        img = r.sum(0) if r.dim() == 3 else r
        m = float(img.abs().max()) or 1.0
        if image is not None:
            base = image.detach().double().cpu()
            base = base.mean(0) if base.dim() == 3 else base
            ax.imshow(base.numpy(), cmap="gray")
        shown = ax.imshow(img.numpy(), cmap="bwr", vmin=-m, vmax=m,
                          alpha=0.6 if image is not None else 1.0)
        ax.figure.colorbar(shown, ax=ax, label="relevance")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{name}, row {row}: relevance summed over channels")
        return ax
    values = r.reshape(-1)
    labels = tokens if tokens is not None and len(tokens) == values.numel() else \
        [f"{name}[{i}]" for i in range(values.numel())]
    order = list(range(values.numel()))
    if values.numel() > top and tokens is None:
        order = sorted(order, key=lambda i: -abs(float(values[i])))[:top]
    vals = [float(values[i]) for i in order]
    ax.bar(range(len(order)), vals, color=["#d62728" if v >= 0 else "#1f77b4" for v in vals])
    ax.set_xticks(range(len(order)), [labels[i] for i in order], rotation=90, fontsize=8)
    ax.axhline(0, color="#555", linewidth=0.5)
    ax.set_ylabel("relevance")
    ax.set_title(f"{name}, row {row}")
    ax.figure.tight_layout()
    return ax


def plot_png(exp: Explanation, input: str, row: int, image: Any = None) -> bytes | None:  # noqa: A002
    """The figure of :func:`plot_explanation` as PNG bytes (for the HTML report), drawn on
    a figure of its own (no pyplot, no backend change), or ``None`` without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    import io

    fig = Figure(figsize=(4.5, 3.6))
    FigureCanvasAgg(fig)
    plot_explanation(exp, input, row=row, image=image, ax=fig.add_subplot())
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()
