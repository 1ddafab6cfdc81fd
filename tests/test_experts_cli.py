"""``dlbhooks experts`` and ``dlbhooks prune`` on checkpoints the test writes
(``save_pretrained`` of tiny Qwen3-MoE, OLMoE, Mixtral, GPT-OSS, JetMoE and Qwen2-MoE with
shared experts, with a character-level tokenizer), on a disk-offloaded one and on the
shipped tiny MoE: the statistics equal the Python API's, the pruned checkpoint loads with
``from_pretrained`` and computes the masked-routing logits, a partial run continues to the
same result, and bad input gets a clear error and loses nothing."""

from __future__ import annotations

import inspect
import json
import string
from pathlib import Path

import pytest
import torch
import transformers
from test_corpus import assert_same_stats
from test_jetmoe import build as build_jetmoe
from test_moe import build as build_moe

import dlbhooks as dlb
from dlbhooks import corpus
from dlbhooks.analysis.pruning import pruned
from dlbhooks.analysis.texts import (
    byte_tokenizer,
    hf_tokenizer,
    read_documents,
    spread_windows,
    token_stream,
)
from dlbhooks.cli import main
from dlbhooks.tiny_moe import load_tiny_moe

FAMILIES = ["qwen3_moe", "olmoe", "mixtral", "gpt_oss", "jetmoe", "qwen2_moe"]
RUN = ["--windows", "6", "--length", "12", "--batch-size", "4", "--positions", "2",
       "--dtype", "float64", "--quiet"]


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """64 ids: <unk>, <s>, </s> and single characters (the tiny models' vocabulary)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in string.ascii_lowercase + string.digits + " \n.,:;()=+-_'\"[]{}#":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def build(name: str) -> torch.nn.Module:
    return build_jetmoe() if name == "jetmoe" else build_moe(name)


def write_checkpoint(name: str, root: Path) -> Path:
    out = root / name
    build(name).save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


def load(path: Path, **kw) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float64, experts_implementation="eager", **kw).eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Two domains of offline text: Python source (JSONL) and prose (plain text)."""
    root = tmp_path_factory.mktemp("data")
    import json as json_mod
    import textwrap

    code = root / "code.jsonl"
    code.write_text("".join(json.dumps({"text": inspect.getsource(f).lower()}) + "\n"
                            for f in (json_mod.dumps, json_mod.loads, textwrap.dedent)))
    prose = root / "prose.txt"
    prose.write_text((textwrap.__doc__ or "") + (inspect.__doc__ or "") * 3)
    return {"code": code, "prose": prose}


def python_api_stats(model: torch.nn.Module, tokenizer, files, windows: int = 6,
                     length: int = 12, batch_size: int = 4, positions=(3, 11)):
    """What the command computes, through the Python API."""
    rows = spread_windows(token_stream(read_documents(files), tokenizer), windows, length + 1)
    return corpus.corpus_expert_stats(model, corpus.chunk(rows, batch_size), target="next",
                                      positions=list(positions), progress=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_experts_and_prune_on_a_written_checkpoint(name, tmp_path, data, capsys):
    ckpt = write_checkpoint(name, tmp_path)
    stats_file = tmp_path / "code.safetensors"
    assert main(["experts", str(ckpt), "--data", str(data["code"]), "--out", str(stats_file),
                 *RUN]) == 0
    got = dlb.ExpertStats.load(stats_file)
    want = python_api_stats(load(ckpt), hf_tokenizer(char_tokenizer()), [data["code"]])
    assert_same_stats(got, want, rtol=0.0)  # the same batches in the same order: identical
    assert got.info["domain"] == "code" and got.info["batches_done"] == 2
    blocks = 4 if name == "jetmoe" else 2  # JetMoE: MLP and attention experts per layer
    assert len(got.layers) == blocks

    out = tmp_path / "pruned"
    assert main(["prune", str(ckpt), "--stats", str(stats_file), "--fraction", "0.25",
                 "--out", str(out), "--eval", f"code={data['code']}", str(data["prose"]),
                 "--random-seeds", "2", "--length", "12", "--dtype", "float64",
                 "--quiet"]) == 0
    info = json.loads((out / "pruned_experts.json").read_text())
    plan = info["dropped"]
    assert set(plan) == set(got.layers) and all(len(v) == 1 for v in plan.values())
    assert plan == {k: v for k, v in got.least(0.25).items()}  # least |relevance|
    model, small = load(ckpt), load(out)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with pruned(model, plan):
            masked = model(input_ids=ids).logits
        got_logits = small(input_ids=ids).logits
    assert not torch.allclose(masked, full)  # the pruning changed something ...
    torch.testing.assert_close(got_logits, masked, rtol=0, atol=1e-12)  # ... the same way
    E = 4
    counts = {getattr(small.config, a, None) for a in ("num_experts", "num_local_experts")}
    assert E - 1 in counts
    report = (out / "report.md").read_text()
    assert "| relevance (written) |" in report and "random (mean of 2 seeds ± SE)" in report
    assert "code loss" in report and "prose loss" in report
    assert "<table class=\"heat\">" in (out / "report.html").read_text()


def test_shipped_model_and_shipped_text(tmp_path):
    """``tiny-moe`` with ``tiny-moe:DOMAIN`` text equals the Python API on the same windows."""
    out = tmp_path / "s.safetensors"
    assert main(["experts", "tiny-moe", "--data", "tiny-moe:prose", "--out", str(out),
                 "--windows", "5", "--length", "16", "--batch-size", "2", "--positions",
                 "last", "--quiet"]) == 0
    model, _ = load_tiny_moe()
    want = python_api_stats(model, byte_tokenizer(), ["tiny-moe:prose"], windows=5, length=16,
                            batch_size=2, positions=(15,))
    got = dlb.ExpertStats.load(out)
    assert_same_stats(got, want, rtol=0.0)
    assert got.info["domain"] == "prose" and got.explanations == 3


def test_disk_offloaded_checkpoint(tmp_path, data):
    ckpt = write_checkpoint("qwen3_moe", tmp_path)
    out = tmp_path / "s.safetensors"
    assert main(["experts", str(ckpt), "--data", str(data["prose"]), "--out", str(out),
                 "--device-map", '{"": "disk"}', "--offload-folder", str(tmp_path / "off"),
                 *RUN]) == 0
    want = python_api_stats(load(ckpt), hf_tokenizer(char_tokenizer()), [data["prose"]])
    assert_same_stats(dlb.ExpertStats.load(out), want, rtol=0.0)  # measured: identical
    pruned_dir = tmp_path / "pruned"
    assert main(["prune", str(ckpt), "--stats", str(out), "--fraction", "0.5",
                 "--by", "frequency", "--out", str(pruned_dir), "--eval", str(data["prose"]),
                 "--random-seeds", "2", "--length", "12", "--dtype", "float64", "--quiet",
                 "--device-map", '{"": "disk"}', "--offload-folder",
                 str(tmp_path / "off2")]) == 0
    plan = json.loads((pruned_dir / "pruned_experts.json").read_text())["dropped"]
    assert plan == dlb.ExpertStats.load(out).least(0.5, "frequency")
    small, model = load(pruned_dir), load(ckpt)
    assert small.config.num_experts == 2
    ids = torch.randint(3, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), pruned(model, plan):
        torch.testing.assert_close(small(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=0, atol=1e-12)
    assert "frequency (written)" in (pruned_dir / "report.md").read_text()


def test_a_partial_run_continues_to_the_same_result(tmp_path, monkeypatch):
    args = ["experts", "tiny-moe", "--data", "tiny-moe:code", "--windows", "6", "--length",
            "16", "--batch-size", "2", "--positions", "2", "--save-every", "1", "--sync-every", "1",
            "--quiet"]
    full = tmp_path / "full.safetensors"
    assert main([*args, "--out", str(full)]) == 0
    part = tmp_path / "part.safetensors"
    calls = {"n": 0}
    real = corpus.explain_batch

    def interrupted(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the session stops during the third batch
        return real(*a, **kw)

    monkeypatch.setattr(corpus, "explain_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(part)])
    monkeypatch.setattr(corpus, "explain_batch", real)
    saved = dlb.ExpertStats.load(part)
    assert saved.info["batches_done"] == 2 and saved.explanations == 4
    assert main([*args, "--out", str(part)]) == 0
    assert_same_stats(dlb.ExpertStats.load(part), dlb.ExpertStats.load(full), rtol=0.0)
    # another run into the same file is refused, not mixed in
    assert main([*args[:-1], "--positions", "last", "--out", str(part)]) == 2
    assert dlb.ExpertStats.load(part).info["batches_done"] == 3


# -- bad input: a clear error, nothing lost -------------------------------------------------
def _llama(root: Path) -> Path:
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    path = root / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def test_bad_input_is_refused(tmp_path, data, capsys):
    ckpt = write_checkpoint("qwen3_moe", tmp_path)
    stats = tmp_path / "s.safetensors"
    assert main(["experts", str(ckpt), "--data", str(data["code"]), "--out", str(stats),
                 *RUN]) == 0
    capsys.readouterr()

    def fails(argv, *needles):
        assert main(argv) == 2
        said = capsys.readouterr().out
        for n in needles:
            assert n in said, said

    llama = _llama(tmp_path)
    fails(["experts", str(llama), "--data", str(data["code"]), "--out",
           str(tmp_path / "x.safetensors"), *RUN], "not a mixture-of-experts checkpoint")
    fails(["prune", str(llama), "--stats", str(stats), "--fraction", "0.25", "--out",
           str(tmp_path / "p0")], "no MoE block")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    fails(["experts", str(ckpt), "--data", str(empty), "--out", str(tmp_path / "e.st"), *RUN],
          "empty.txt", "no text")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    fails(["experts", str(ckpt), "--data", str(binary), "--out", str(tmp_path / "e.st"),
           *RUN], "blob.txt", "cannot read")
    fails(["experts", str(ckpt), "--data", str(tmp_path / "missing.txt"), "--out",
           str(tmp_path / "e.st"), *RUN], "missing.txt")
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    fails(["experts", str(ckpt), "--data", str(bad_jsonl), "--out", str(tmp_path / "e.st"),
           *RUN], "bad.jsonl, line 2", "'text'")
    # a fraction leaving fewer experts than top-k (4 experts, top-2: 0.75 leaves 1)
    fails(["prune", str(ckpt), "--stats", str(stats), "--fraction", "0.75", "--out",
           str(tmp_path / "p1")], "fewer than the 2 experts", "largest fraction is 0.5")
    assert not (tmp_path / "p1").exists()
    # statistics of another model: 3 layers instead of 2, or 8 experts instead of 4
    other = tmp_path / "other"
    cfg = build_moe("qwen3_moe").config
    cfg.num_hidden_layers = 3
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    fails(["prune", str(other), "--stats", str(stats), "--fraction", "0.25", "--out",
           str(tmp_path / "p2")], "do not match", "model.layers.2.mlp")
    cfg.num_hidden_layers, cfg.num_experts = 2, 8
    wide = tmp_path / "wide"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(wide)
    fails(["prune", str(wide), "--stats", str(stats), "--fraction", "0.25", "--out",
           str(tmp_path / "p3")], "4 experts in the statistics and 8")
    fails(["prune", str(ckpt), "--stats", str(data["code"]), "--fraction", "0.25", "--out",
           str(tmp_path / "p4")], "not an expert statistics file")
    # an output directory that exists: no overwrite without --force
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    fails(["prune", str(ckpt), "--stats", str(stats), "--fraction", "0.25", "--out",
           str(keep)], "exists", "--force")
    assert [p.name for p in keep.iterdir()] == ["precious.txt"]
    assert main(["prune", str(ckpt), "--stats", str(stats), "--fraction", "0.25", "--out",
                 str(keep), "--force", "--quiet"]) == 0
    assert (keep / "config.json").exists() and not (keep / "precious.txt").exists()
