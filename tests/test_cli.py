"""The README's main job: `dlbhooks demo` on the models that ship with the package."""

from dlbhooks.cli import main


def test_demo_tiny_moe(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "relevance per expert" in out and "model.layers.3.mlp" in out
    assert "seeded 100.0" in out


def test_demo_digits(capsys):
    assert main(["demo", "--model", "digits", "--samples", "2", "--mode", "contrastive"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "sample" in out
