"""HTML reports (dlbhooks/report.py): self-contained, every token with its value, both
streams, heads and experts, escaped text."""

from __future__ import annotations

import re

import torch
from helpers import tiny_llama

import dlbhooks as dlb


def _llama_explanation(mode: str):
    model = tiny_llama()
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(0))
    with dlb.trace(model) as tape:
        model(input_ids=ids)
    return tape.explain(mode=mode)


def test_a_report_is_one_offline_file_with_every_token_and_value():
    exp = _llama_explanation("default")
    tokens = ["<script>", " a", " b", "\n", " c", " d"]
    page = exp.to_html(tokens, title="tiny Llama")
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert not re.search(r"https?://|<script|<link|@import|src=", page)  # nothing to fetch
    assert "&lt;script&gt;" in page and "⏎" in page  # escaped, visible
    values = exp.inputs["input_ids"][0].tolist()
    for tok, v in zip(tokens[1:3], values[1:3]):
        assert f'{tok}: {v:.4g}"' in page  # the value on hover
    assert "Relevance per attention head" in page and "model.layers.1.self_attn" in page
    assert "conservation error" in page and exp._repr_html_() == exp.to_html()


def test_contrastive_reports_show_both_streams():
    page = _llama_explanation("contrastive").to_html([f"t{i}" for i in range(6)])
    assert "+ stream" in page and "− stream" in page and "(+ / −)" in page


def test_moe_reports_show_experts_and_routing():
    from dlbhooks.tiny_moe import encode, load_tiny_moe

    model = load_tiny_moe(dtype=torch.float64)[0]
    ids = encode("def f(x):\n    return x")[None]
    with dlb.trace(model) as tape:
        model(input_ids=ids)
    page = tape.explain().to_html()
    assert "Relevance per expert (layer × expert)" in page
    assert "Routing frequency (layer × expert)" in page
    assert page.count("model.layers.0.mlp") >= 3  # layer × expert, frequency, token × expert
    assert "Token × expert, per layer" in page and "<details><summary>model.layers.0.mlp" in page


def test_tabular_inputs_get_bars_per_feature():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(),
                                torch.nn.Linear(4, 2)).double()
    page = dlb.explain(model, torch.randn(3, 5, dtype=torch.float64)).to_html(row=1)
    assert "Input input (row 1): features by |relevance|" in page and "input[4]" in page


def test_generation_reports_show_the_matrix_and_each_token_s_map():
    model = tiny_llama()
    ids = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(1))
    for mode in ("default", "contrastive"):
        gen = dlb.explain_generation(model, ids, max_new_tokens=3, mode=mode)
        page = gen.to_html(title="tiny Llama generation")
        assert not re.search(r"https?://|<script|<link|src=", page)
        assert "Generated token × context token" in page
        assert page.count("<details>") == 3 and gen._repr_html_() == gen.to_html()
        value = f"{float(gen.matrix[2, 4]):.4g}"
        assert f": {value}\"" in page  # a context token's value for the third token
        assert ("+ stream" in page) == (mode == "contrastive")


def test_plots_of_an_image_and_of_tabular_features(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from dlbhooks.demo import load_digits_model

    cnn, images = load_digits_model()[:2]
    ax = dlb.explain(cnn.double(), images[:1].double()).plot()
    image = ax.images[0].get_array()
    assert image.shape == (8, 8) and ax.images[0].get_clim()[0] == -ax.images[0].get_clim()[1]
    ax.figure.savefig(tmp_path / "digit.png")
    exp = dlb.explain(cnn.double(), images[:1].double())
    over = exp.plot(image=images[0])
    assert len(over.images) == 2 and over.images[1].get_alpha() == 0.6  # grey under heat
    page = exp.to_html(image=images[:1])
    assert page.count('src="data:image/png;base64,') == 1  # the figure, embedded
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(),
                              torch.nn.Linear(4, 2)).double()
    exp = dlb.explain(mlp, torch.randn(2, 5, dtype=torch.float64))
    ax = exp.plot(row=1)
    heights = [p.get_height() for p in ax.patches]
    assert torch.allclose(torch.tensor(heights, dtype=torch.float64), exp.inputs["input"][1])
