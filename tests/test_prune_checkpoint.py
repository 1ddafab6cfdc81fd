"""prune_checkpoint: experts removed from a checkpoint directory tensor by tensor (no model
loaded) give the model that masked routing (``pruned``) computes, for every supported
family, sharded or not; the plan is checked before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_jetmoe
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_moe import IDS, build

from dlbhooks.analysis.checkpoint import _set_counts, moe_layout, prune_checkpoint
from dlbhooks.analysis.pruning import pruned, write_pruned_checkpoint

FAMILIES = ["qwen3_moe", "olmoe", "mixtral", "gpt_oss", "qwen2_moe", "jetmoe"]
MLP = {"model.layers.0.mlp": [1], "model.layers.1.mlp": [3]}
#: JetMoE: both MLP blocks and both mixture-of-attention blocks (the config has one count)
JET = {**MLP, "model.layers.0.self_attention.experts": [0],
       "model.layers.1.self_attention.experts": [2]}


def make(name: str) -> torch.nn.Module:
    return test_jetmoe.build() if name == "jetmoe" else build(name)


def plan_for(name: str) -> dict[str, list[int]]:
    return JET if name == "jetmoe" else MLP


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def expert_size(config, block: str) -> int:
    """Parameters one expert of ``block`` holds (its weights and biases, its router row and
    bias), from the config alone."""
    c = config
    H = c.hidden_size
    if c.model_type == "gpt_oss":
        I = c.intermediate_size
        return H * 2 * I + 2 * I + I * H + H + H + 1
    if c.model_type == "jetmoe" and block.endswith("self_attention.experts"):
        return 2 * H * c.kv_channels * c.num_key_value_heads + H  # query / output projection
    I = c.moe_intermediate_size if c.model_type in ("qwen3_moe", "qwen2_moe") else \
        c.intermediate_size
    return 3 * I * H + H  # gate, up, down; router row


def reload(path: Path, name: str, **kw) -> torch.nn.Module:
    if name != "jetmoe":
        kw["experts_implementation"] = "eager"
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float64, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_checkpoint_equals_masked_routing(name, tmp_path):
    model, plan = make(name), plan_for(name)
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    summary = prune_checkpoint(src, plan, out)
    small = reload(out, name)
    full = logits(model)
    with pruned(model, plan):
        want = logits(model)
    got = logits(small)
    assert not torch.allclose(want, full)  # the pruning changed something ...
    assert torch.allclose(got, want, rtol=0, atol=1e-12)  # ... and the checkpoint agrees
    removed = sum(len(ids) * expert_size(model.config, b) for b, ids in plan.items())
    assert n_params(model) - n_params(small) == removed
    assert summary["parameters_before"] - summary["parameters_after"] == removed
    assert summary["parameters_after"] == sum(t.numel() for t in tensors(out).values())
    assert summary["bytes_after"] == 8 * summary["parameters_after"]  # float64
    assert [getattr(small.config, k) for k in ("num_experts", "num_local_experts")
            if hasattr(small.config, k)] in ([3], [3, 3])  # (Qwen3-MoE: one is an alias)
    stored_cfg = json.loads((out / "config.json").read_text())
    assert [stored_cfg[k] for k in ("num_experts", "num_local_experts") if k in stored_cfg] == [3]
    info = json.loads((out / "pruned_experts.json").read_text())
    assert info["dropped"] == plan
    assert info["kept"] == {b: [e for e in range(4) if e not in plan.get(b, [])]
                            for b in moe_layout(model)}
    assert (out / "generation_config.json").read_text() == \
        (src / "generation_config.json").read_text()
    # the in-memory route (drop_experts + save_pretrained) writes the very same tensors
    write_pruned_checkpoint(model, plan, tmp_path / "mem")
    mem, disk = tensors(tmp_path / "mem"), tensors(out)
    assert mem.keys() == disk.keys() and all(torch.equal(mem[k], disk[k]) for k in mem)


def test_sharded_source_gives_the_same_checkpoint(tmp_path):
    model = build("mixtral")  # on disk: block_sparse_moe.experts.<j>.w1 (renamed on loading)
    src, one, out = tmp_path / "src", tmp_path / "one", tmp_path / "out"
    model.save_pretrained(one)
    model.save_pretrained(src, max_shard_size="40KB")
    (src / "tokenizer.json").write_text('{"stand-in": true}\n')
    (src / "original").mkdir()  # e.g. unpruned weights in another format: not copied
    save_file({"w": torch.zeros(2)}, str(src / "original" / "model.safetensors"))
    save_file({"w": torch.zeros(2)}, str(src / "consolidated.safetensors"))
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    assert len(shards) > 2
    plan = {"model.layers.0.mlp": [0], "model.layers.1.mlp": [2]}
    summary = prune_checkpoint(src, plan, out)
    prune_checkpoint(one, plan, tmp_path / "single")
    assert torch.equal(logits(reload(out, "mixtral")), logits(reload(tmp_path / "single",
                                                                      "mixtral")))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    written = {}
    for shard in sorted(set(index["weight_map"].values())):
        assert shard in shards
        with safe_open(str(out / shard), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            written.update({k: shard for k in f.keys()})
    assert written == index["weight_map"]
    stored = tensors(out)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in stored.values())
    assert index["metadata"]["total_parameters"] == summary["parameters_after"]
    # expert 3 of layer 0 is now expert 2, under its on-disk name
    key = "model.layers.0.block_sparse_moe.experts.{}.w1.weight"
    old = load_file(one / "model.safetensors")[key.format(3)]
    assert torch.equal(stored[key.format(2)], old) and key.format(3) not in stored
    assert (out / "tokenizer.json").read_text() == '{"stand-in": true}\n'
    assert not (out / "original").exists() and not (out / "consolidated.safetensors").exists()
    assert summary["copied"] == ["generation_config.json", "tokenizer.json"]
    assert summary["skipped"] == ["consolidated.safetensors", "original"]


def offload_map(name: str) -> dict[str, str]:
    """Everything on disk; JetMoE: its attention (and tied embeddings) on the CPU, as its
    mixture-of-attention runs through ``map`` / ``reduce`` methods that accelerate's forward
    hook does not see (offloaded, it fails with or without pruning)."""
    if name != "jetmoe":
        return {"": "disk"}
    out = dict.fromkeys(["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"],
                        "cpu")
    for i in range(2):
        out.update({f"model.layers.{i}.self_attention": "cpu", f"model.layers.{i}.mlp": "disk",
                    f"model.layers.{i}.input_layernorm": "disk",
                    f"model.layers.{i}.post_attention_layernorm": "disk"})
    return out


@pytest.mark.parametrize("name", ["qwen3_moe", "jetmoe"])
def test_masked_routing_on_an_offloaded_model(name, tmp_path):
    model, plan = make(name), plan_for(name)
    model.save_pretrained(tmp_path / "src")
    prune_checkpoint(tmp_path / "src", plan, tmp_path / "out")
    offloaded = reload(tmp_path / "src", name, device_map=offload_map(name),
                       offload_folder=str(tmp_path / "off"))
    meta = [n for n, p in offloaded.named_parameters() if p.device.type == "meta"]
    routers = ("model.layers.1.mlp.gate.", "model.layers.1.mlp.router.")
    assert any(n.startswith(routers) for n in meta)  # the hooked router is really offloaded
    with pruned(offloaded, plan):
        got = logits(offloaded)
    want = logits(reload(tmp_path / "out", name))
    assert not torch.allclose(logits(offloaded), want)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_layout_from_the_config_alone():
    config = test_jetmoe.config()
    layout = moe_layout(config)
    assert set(layout) == set(JET)
    block = layout["model.layers.1.self_attention.experts"]
    assert (block.num_experts, block.top_k, block.router, block.experts) == \
        (4, 2, "router", ("input_linear", "output_linear"))
    model = build("qwen2_moe")
    assert moe_layout(model.config) == moe_layout(model)
    assert moe_layout(model)["model.layers.0.mlp"].router == "gate"


def test_expert_counts_in_nested_configs():
    cfg = {"num_experts": 4, "text_config": {"num_local_experts": 4, "num_experts_per_tok": 2},
           "vision_config": {"num_experts": 8}}
    assert _set_counts(cfg, {4}, 3) == 2
    assert cfg == {"num_experts": 3, "text_config": {"num_local_experts": 3,
                                                      "num_experts_per_tok": 2},
                   "vision_config": {"num_experts": 8}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("qwen3_moe")
    build("qwen3_moe").save_pretrained(src)
    return src


BOTH = ["model.layers.0.mlp", "model.layers.1.mlp"]


@pytest.mark.parametrize("plan, match", [
    ({b: [0, 1, 2] for b in BOTH}, "fewer than top_k=2"),
    ({BOTH[0]: [1], BOTH[1]: [4]}, r"model\.layers\.1\.mlp: expert ids \[4\] out of range"),
    ({BOTH[0]: [1], BOTH[1]: [-1]}, "out of range"),
    ({BOTH[0]: [1]}, r"same number of experts.*'model\.layers\.1\.mlp': 4"),
    ({**{b: [0] for b in BOTH}, "model.layers.0.self_attn": [0]},
     r"not MoE blocks.*model\.layers\.0\.self_attn"),
    ({}, "drops no expert"),
    ({b: [] for b in BOTH}, "drops no expert"),
])
def test_bad_plans_raise_before_writing(saved, tmp_path, plan, match):
    with pytest.raises(ValueError, match=match):
        prune_checkpoint(saved, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_moe_checkpoint_raises(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=16)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="no MoE block with a supported router"):
        prune_checkpoint(tmp_path / "src", {"model.layers.0.mlp": [0]}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_and_source_directories_are_protected(saved, tmp_path):
    plan = {b: [0] for b in BOTH}
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(FileExistsError, match="not empty"):
        prune_checkpoint(saved, plan, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine\n"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in saved.iterdir())
    with pytest.raises(ValueError, match="out_dir is src_dir"):
        prune_checkpoint(saved, plan, saved, force=True)
    with pytest.raises(ValueError, match="contains src_dir"):
        prune_checkpoint(saved, plan, saved.parent, force=True)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in saved.iterdir()) == before
    prune_checkpoint(saved, plan, out, force=True)  # replaces the contents
    assert not (out / "notes.txt").exists()
    assert transformers.AutoConfig.from_pretrained(out).num_experts == 3


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """A copy of a single-file checkpoint with its tensors edited by ``edit(dict)``."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_checkpoints_not_matching_the_layout_raise(saved, tmp_path):
    plan = {b: [0] for b in BOTH}
    bad = _rewrite(saved, tmp_path / "bad", lambda s: s.update(
        {"model.layers.1.mlp.gate.weight": torch.zeros(5, 32, dtype=torch.float64)}))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate\.weight has shape "
                                         r"\[5, 32\]"):
        prune_checkpoint(bad, plan, tmp_path / "out")
    gone = _rewrite(saved, tmp_path / "gone", lambda s: s.pop("model.layers.0.mlp.gate.weight"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp: no tensor of its router.*"
                                         "layout not understood"):
        prune_checkpoint(gone, plan, tmp_path / "out")
    lost = _rewrite(saved, tmp_path / "lost", lambda s: [
        s.pop(k) for k in list(s) if k.startswith("model.layers.1.mlp.experts.2.")])
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp: experts \[2\] not found"):
        prune_checkpoint(lost, plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()
