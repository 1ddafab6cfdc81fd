"""The README's main job: `dlbhooks demo` on the models that ship with the package."""

import pytest

from dlbhooks.cli import main


def test_demo_tiny_moe(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "relevance per expert" in out and "model.layers.3.mlp" in out
    assert "seeded 100.0" in out


def test_demo_digits(capsys):
    assert main(["demo", "--model", "digits", "--samples", "2", "--mode", "contrastive"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and out.count("\nsample ") == 2
    assert "+ stream: inputs" in out and "- stream: inputs" in out and "= seeded 200.0" in out


def test_demo_contrastive_moe_totals_per_stream_and_expert_headers(capsys):
    assert main(["demo", "--mode", "contrastive"]) == 0
    out = capsys.readouterr().out
    assert "layer / expert" in out and "+ stream: inputs" in out and "= seeded 100.0" in out
    assert "(per stream)" not in out


@pytest.mark.parametrize("argv", [["demo", "--model", "digits", "--samples", "0"],
                                  ["demo", "--samples", "2"]])
def test_demo_rejects_samples_it_cannot_use(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code != 0
    assert "--samples" in capsys.readouterr().err + str(exit_.value.code)


def test_help_texts(capsys):
    """`--help` says what each command does, in plain text (no reStructuredText markup)."""
    outs = {}
    for argv in ([], ["demo"], ["experts"], ["prune"]):
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--help"])
        assert exit_.value.code == 0
        outs[" ".join(argv)] = " ".join(capsys.readouterr().out.split())
    for out in outs.values():
        assert "``" not in out and ":mod:" not in out and ":func:" not in out, out
    assert "by default the tiny byte-level mixture-of-experts language model" in outs[""]
    assert "--model digits" in outs[""] and "--model digits" in outs["demo"]
    assert "--prompt" in outs["demo"] and "--samples" in outs["demo"]
    assert "accelerate launch -m dlbhooks.cli experts" in outs["experts"]
    assert "--fraction" in outs["prune"] and "--eval" in outs["prune"]
