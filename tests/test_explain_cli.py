"""``dlbhooks explain CHECKPOINT`` on a checkpoint directory written here (a tiny random
Llama and a word-level tokenizer, no network) and ``dlbhooks report``."""

from __future__ import annotations

import pytest
import torch

import dlbhooks as dlb
from dlbhooks.cli import main

WORDS = ["[UNK]", "[PAD]", "the", "cat", "sat", "on", "a", "warm", "mat", "and", "dog", "ran"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=16)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                         pad_token="[PAD]").save_pretrained(path)
    return path


def test_explain_writes_a_summary_a_report_and_a_result(checkpoint, tmp_path, capsys):
    out, saved = tmp_path / "r.html", tmp_path / "r.safetensors"
    code = main(["explain", str(checkpoint), "--prompt", "the cat sat on a warm",
                 "--target", "mat", "--out", str(out), "--save", str(saved)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "explained: target 'mat' (id 8)" in text and "most relevant input tokens" in text
    assert "conservation error" in text
    page = out.read_text(encoding="utf-8")
    assert "warm" in page and "Relevance per attention head" in page
    exp = dlb.Explanation.load(saved)
    assert exp.target == 8 and exp.info["tokens"][-1] == "warm"
    assert exp.conservation_error() < 1e-5  # float32
    again = tmp_path / "again.html"
    assert main(["report", str(saved), "--out", str(again)]) == 0
    assert "warm" in again.read_text(encoding="utf-8")


def test_contrastive_and_ids_and_a_numeric_target(checkpoint, capsys):
    code = main(["explain", str(checkpoint), "--ids", "2,3,4", "--target", "5", "--mode",
                 "contrastive", "--dtype", "float64"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "mode contrastive" in text and "seeded (100.0, " in text  # both streams


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "the cat", "--target", "zebra"], "not a token of the vocabulary"),
    (["--prompt", " ".join(["cat"] * 20)], "the model's context is 16"),
    (["--ids", "2,99"], "outside the model's vocabulary of 12"),
    (["--ids", "2,x"], "comma-separated integers"),
])
def test_clear_errors(checkpoint, capsys, argv, message):
    assert main(["explain", str(checkpoint), *argv]) == 2
    assert message in capsys.readouterr().out


def test_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    assert main(["explain", str(tmp_path), "--ids", "1,2"]) == 2
    assert "is not a checkpoint directory: it has no config.json" in capsys.readouterr().out
