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
    (["--prompt", "the cat", "--target", "zebra"], "not one token of the vocabulary"),
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


def test_generate_explains_each_token_and_reports(checkpoint, tmp_path, capsys):
    out, saved = tmp_path / "g.html", tmp_path / "g.safetensors"
    for extra in ([], ["--do-sample", "--top-k", "5", "--seed", "0", "--mode", "contrastive"]):
        code = main(["explain", str(checkpoint), "--prompt", "the cat sat", "--generate", "3",
                     "--explain-tokens", "2", "--out", str(out), "--save", str(saved),
                     *extra])
        text = capsys.readouterr().out
        assert code == 0, text
        assert "generated 2 token(s)" in text and "most relevant" in text
        assert "Generated token × context token" in out.read_text(encoding="utf-8")
        gen = dlb.GenerationExplanation.load(saved)
        assert gen.n == 2 and gen.conservation_error() < 1e-5
    again = tmp_path / "again.html"
    assert main(["report", str(saved), "--out", str(again)]) == 0
    assert "<details>" in again.read_text(encoding="utf-8")


def _tokenizer(path, words):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                         pad_token="[PAD]", mask_token="[MASK]"
                                         ).save_pretrained(path)


@pytest.mark.parametrize("family", ["gpt2", "bert-cls", "bert-mlm", "qwen3_moe"])
def test_other_checkpoints_in_both_modes(family, tmp_path, capsys):
    import transformers

    words = [*WORDS, "[MASK]"]
    torch.manual_seed(0)
    small = dict(vocab_size=len(words), num_attention_heads=2)
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=16, n_layer=2, n_positions=16, **small))
    elif family.startswith("bert"):
        cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=2, intermediate_size=32,
                                      num_labels=3, **small)
        model = (transformers.BertForSequenceClassification(cfg) if family == "bert-cls"
                 else transformers.BertForMaskedLM(cfg))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_experts=4,
            num_experts_per_tok=2, num_hidden_layers=2, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=16, **small))
    model.save_pretrained(tmp_path)
    _tokenizer(tmp_path, words)
    prompt = "the cat [MASK] on a mat" if family == "bert-mlm" else "the cat sat on a"
    for mode in ("default", "contrastive"):
        saved = tmp_path / f"{mode}.safetensors"
        code = main(["explain", str(tmp_path), "--prompt", prompt, "--mode", mode,
                     "--dtype", "float64", "--save", str(saved)])
        text = capsys.readouterr().out
        assert code == 0, text
        exp = dlb.Explanation.load(saved)
        assert exp.mode == mode and exp.conservation_error() < 1e-12
        if family == "bert-mlm":
            assert exp.info["position"] == [2]  # the mask token
        # the saved result equals the same explanation made in Python
        auto = {"gpt2": "AutoModelForCausalLM", "qwen3_moe": "AutoModelForCausalLM",
                "bert-cls": "AutoModelForSequenceClassification",
                "bert-mlm": "AutoModelForMaskedLM"}[family]
        extra = {"experts_implementation": "eager"} if family == "qwen3_moe" else {}
        again = getattr(transformers, auto).from_pretrained(
            tmp_path, local_files_only=True, dtype=torch.float64, **extra).eval()
        enc = transformers.AutoTokenizer.from_pretrained(tmp_path)(prompt, return_tensors="pt")
        direct = dlb.explain(again, dict(enc), mode=mode,
                             **({"position": 2} if family == "bert-mlm" else {}))
        assert torch.equal(exp.inputs["input_ids"], direct.inputs["input_ids"])


def test_a_device_map_with_part_of_the_model_on_disk(checkpoint, tmp_path, capsys):
    plain, offloaded = tmp_path / "plain.safetensors", tmp_path / "disk.safetensors"
    assert main(["explain", str(checkpoint), "--prompt", "the cat sat", "--save",
                 str(plain)]) == 0
    device_map = ('{"model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": '
                  '"cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}')
    code = main(["explain", str(checkpoint), "--prompt", "the cat sat", "--device-map",
                 device_map, "--offload-folder", str(tmp_path / "off"), "--save",
                 str(offloaded)])
    assert code == 0, capsys.readouterr().out
    a, b = dlb.Explanation.load(plain), dlb.Explanation.load(offloaded)
    assert torch.allclose(a.inputs["input_ids"], b.inputs["input_ids"], rtol=0, atol=1e-5)


def test_token_string_targets_through_a_tokenizer(checkpoint):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint,
                                                              local_files_only=True)
    enc = tok("the cat sat on a", return_tensors="pt")
    by_string = dlb.explain(model, enc, target="mat", tokenizer=tok)
    by_id = dlb.explain(model, enc, target=8)
    assert by_string.target == 8 and torch.equal(by_string.inputs["input_ids"],
                                                 by_id.inputs["input_ids"])
    with pytest.raises(dlb.TargetError, match="not one token of the vocabulary"):
        dlb.explain(model, enc, target="zebra crossing", tokenizer=tok)


def test_explain_tokens_as_a_list_leaves_the_others_unexplained(checkpoint, tmp_path, capsys):
    saved = tmp_path / "g.safetensors"
    code = main(["explain", str(checkpoint), "--prompt", "the cat sat", "--generate", "4",
                 "--explain-tokens", "0,2", "--save", str(saved), "--out",
                 str(tmp_path / "g.html")])
    text = capsys.readouterr().out
    assert code == 0, text
    gen = dlb.GenerationExplanation.load(saved)
    assert gen.n == 3 and torch.isnan(gen.absorbed[1]) and not torch.isnan(gen.absorbed[2])
    assert gen.conservation_error() < 1e-5
    assert (tmp_path / "g.html").read_text(encoding="utf-8").count("<details>") == 2
    assert main(["explain", str(checkpoint), "--prompt", "the cat", "--generate", "2",
                 "--explain-tokens", "5"]) == 0
    assert main(["explain", str(checkpoint), "--prompt", "the cat", "--generate", "2",
                 "--explain-tokens", "0,7"]) == 2
