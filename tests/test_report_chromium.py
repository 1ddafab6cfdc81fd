"""Reports as users see them: rendered by headless Chromium (Debian's ``chromium``, which
.ci/run installs), for a causal LM prompt, a sequence classifier, the tiny MoE, an image
CNN and a tabular MLP. The rendered DOM holds every token and the values on hover, nothing
is fetched from outside the file, and text meant to attack the page stays text."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama

import dlbhooks as dlb

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="needs headless Chromium (Debian's "
                                "chromium package; .ci/run installs it)")
ATTACK = ["<script>alert(1)</script>", '" onmouseover="alert(2)', " cat", " sat", "\n", " on"]


def _render(page: str, tmp: Path, name: str) -> tuple[str, int]:
    """The DOM Chromium builds from ``page`` and the size of its screenshot."""
    assert page.count("<") > 10
    path = tmp / f"{name}.html"
    path.write_text(page, encoding="utf-8")
    flags = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", path.as_uri()], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    png = tmp / f"{name}.png"
    subprocess.run([*flags, f"--screenshot={png}", "--window-size=1100,900", path.as_uri()],
                   capture_output=True, timeout=120, check=True)
    return dom, png.stat().st_size


def _tags(dom: str) -> list[tuple[str, list[str]]]:
    """Every element of the rendered DOM with its attribute names."""
    from html.parser import HTMLParser

    found: list[tuple[str, list[str]]] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.append((tag, [a for a, _ in attrs]))

    Collect().feed(dom)
    return found


def _offline(page: str) -> None:
    assert not re.search(r'https?://|<link|@import|\bsrc="(?!data:)', page)  # nothing leaves


def test_causal_lm_report_escapes_untrusted_tokens(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 40, (1, len(ATTACK)), generator=torch.Generator().manual_seed(0))
    with dlb.trace(model) as tape:
        model(input_ids=ids)
    exp = tape.explain(mode="contrastive")
    page = exp.to_html(ATTACK)
    _offline(page)
    dom, png = _render(page, tmp_path, "causal_lm")
    tags = _tags(dom)  # the attack is text, not markup: nothing can run
    assert "script" not in {t for t, _ in tags}
    assert not any(a.startswith("on") for _, attrs in tags for a in attrs)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and 'onmouseover="alert(2)' in dom
    for tok in (" cat", " sat", " on"):
        assert f">{tok}<" in dom
    value = f"{float(exp.inputs['input_ids'][0, ATTACK.index(' sat')]):.4g}"
    assert f'title=" sat: {value}"' in dom  # the value on hover
    assert "+ stream" in dom and png > 10_000


def test_classifier_moe_image_and_tabular_reports_render(tmp_path):
    import transformers

    from dlbhooks.demo import load_digits_model
    from dlbhooks.tiny_moe import decode, encode, load_tiny_moe

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=32, num_labels=3)
    bert = transformers.BertForSequenceClassification(cfg).double().eval()
    ids = torch.tensor([[2, 5, 7, 9, 3]])
    cls = dlb.explain(bert, {"input_ids": ids})
    moe_model = load_tiny_moe(dtype=torch.float64)[0]
    text_ids = encode("def f(x):\n    return x")[None]
    with dlb.trace(moe_model) as tape:
        moe_model(input_ids=text_ids)
    moe = tape.explain()
    digits, images = load_digits_model()[:2]
    image = dlb.explain(digits.double(), images[:1].double())
    image_page = image.to_html(image=images[:1])
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    tab = dlb.explain(mlp.double(), torch.randn(2, 6, dtype=torch.float64))
    gen = dlb.explain_generation(tiny_llama(), torch.tensor([[3, 7, 11, 2]]), max_new_tokens=3)
    torch.manual_seed(1)
    sampled = dlb.explain_generation(tiny_llama(), torch.tensor([[3, 7, 11, 2]]),
                                     max_new_tokens=3, do_sample=True, top_k=10,
                                     mode="contrastive")
    kinds = {
        "generation": (gen.to_html(), ["Generated token × context token", "<details>"]),
        "sampled": (sampled.to_html(), ["Generated token × context token", "+ stream"]),
        "classifier": (cls.to_html(["[CLS]", "good", "film", "indeed", "[SEP]"]),
                       ["good", "film", "indeed"]),
        "moe": (moe.to_html([decode([int(i)]) for i in text_ids[0]]),
                ["Relevance per expert (layer × expert)", "Routing frequency"]),
        "image": (image_page, ["pixel relevance, summed over channels", "data:image/png"]),
        "tabular": (tab.to_html(), ["features by |relevance|", "input[5]"]),
    }
    for name, (page, expected) in kinds.items():
        _offline(page)
        dom, png = _render(page, tmp_path, name)
        for text in expected:
            assert text in dom, (name, text)
        assert "script" not in {t for t, _ in _tags(dom)} and png > 10_000, name


def test_pruning_report_renders(tmp_path):
    """``dlbhooks prune --eval``'s HTML page: the loss table, verdicts and the three layer ×
    expert heatmaps, with untrusted domain names kept as text."""
    from dlbhooks.analysis.experts import ExpertStats, _Layer
    from dlbhooks.analysis.prune_eval import PruningEvaluation

    stats = ExpertStats()
    for i in range(3):
        r = torch.arange(1.0, 7.0, dtype=torch.float64) * (i + 1)
        stats.layers[f"model.layers.{i}.mlp"] = _Layer(r, r, r.flip(0), r, tokens=100)
    bad = ATTACK[0]
    ev = PruningEvaluation(0.5, 3, "relevance", {"code": 1.4, bad: 1.2},
                           {"relevance": {"code": 1.9, bad: 1.6},
                            "frequency": {"code": 2.1, bad: 1.5}},
                           {"code": [2.0, 2.05, 1.95], bad: [1.7, 1.65, 1.75]},
                           {"relevance": stats.least(0.5), "frequency": stats.least(0.5,
                                                                                    "frequency")},
                           stats, {"title": "pruning <b>report</b>"})
    page = ev.to_html()
    _offline(page)
    dom, png = _render(page, tmp_path, "pruning")
    for text in ("Held-out loss", "Relevance share (layer × expert)", "Routing frequency",
                 "Pruned experts (relevance)", "model.layers.2.mlp", "+0.5000",
                 "&lt;script&gt;alert(1)&lt;/script&gt; loss", "pruning &lt;b&gt;report"):
        assert text in dom, text
    assert "script" not in {t for t, _ in _tags(dom)} and png > 10_000
