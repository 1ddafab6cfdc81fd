"""Models loaded by accelerate with offloaded weights explain like the in-memory model.

Tiny Llama and Qwen3-MoE models are saved as safetensors and reloaded (a) with every
layer on disk, (b) with a device map mixing "cpu" and "disk", (c) with
``init_empty_weights`` + ``load_checkpoint_and_dispatch``. On this CPU machine accelerate
keeps the offloaded weights on the meta device and loads them inside each forward; the
reverse pass must load them again, one module at a time, through ``fetch_param``.
"""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3MoeConfig

import dlbhooks as dlb
from dlbhooks.records import fetch_param

# the same float32 weights through the same operations: the relevance is bit-identical
# (measured 0 in every comparison below)
TOL = 0.0


def _config(kind: str):
    common = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if kind == "llama":
        return LlamaConfig(intermediate_size=64, **common)
    return Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                          num_experts_per_tok=2, head_dim=8, decoder_sparse_step=1,
                          mlp_only_layers=[], **common)


def _device_map(how: str) -> dict[str, str]:
    if how == "disk":
        return {"": "disk"}
    # a map mixing "cpu" and "disk" (and, for (c), the form load_checkpoint_and_dispatch takes)
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
            "model.layers.1": "cpu", "model.norm": "disk", "lm_head": "disk"}


@pytest.fixture(scope="module", params=["llama", "moe"])
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    kind = request.param
    model = AutoModelForCausalLM.from_config(_config(kind)).eval()
    root = tmp_path_factory.mktemp(kind)
    model.save_pretrained(root / "hf")  # the Hugging Face layout from_pretrained reads
    (root / "native").mkdir()
    save_model(model, str(root / "native" / "model.safetensors"))  # the module's own keys
    ids = torch.randint(0, 61, (2, 7))
    refs = {mode: dlb.explain(model, ids, mode=mode) for mode in ("default", "contrastive")}
    with dlb.trace(model):  # dlbhooks' attention: compare like with like
        logits = model(ids).logits
    return kind, model.config, root, ids, refs, logits


def _load(how: str, config, root, tmp_path):
    if how in ("disk", "mixed"):
        return AutoModelForCausalLM.from_pretrained(
            root / "hf", device_map=_device_map(how), offload_folder=str(tmp_path / "off"))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    # "preload": the MLP / MoE block's hook loads its children's weights (they have none)
    preload = None if how == "dispatch" else ["LlamaMLP", "Qwen3MoeSparseMoeBlock"]
    return load_checkpoint_and_dispatch(
        model, str(root / "native" / "model.safetensors"), device_map=_device_map("mixed"),
        offload_folder=str(tmp_path / "off"), preload_module_classes=preload)


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("how", ["disk", "mixed", "dispatch", "preload"])
def test_offloaded_model_explains_like_in_memory(saved, how, tmp_path):
    kind, config, root, ids, refs, logits = saved
    model = _load(how, config, root, tmp_path).eval()
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert meta, "the loader offloaded nothing: the test would not test offloading"
    if how == "preload":  # some offloaded weights belong to modules without a hook
        owners = {n.rsplit(".", 1)[0] for n in meta}
        assert any(getattr(model.get_submodule(o), "_hf_hook", None) is None for o in owners)
    for mode, ref in refs.items():
        with dlb.trace(model) as tape:
            out = model(ids)
        exp = tape.explain(mode=mode)
        assert torch.equal(out.logits, logits)
        if mode == "default":
            assert _close(exp.inputs["input_ids"], ref.inputs["input_ids"]) <= TOL
        else:
            for stream in ("positive", "negative"):
                got = getattr(exp, stream)["input_ids"]
                assert _close(got, getattr(ref, stream)["input_ids"]) <= TOL
        assert exp.layers.keys() == ref.layers.keys()
        if kind == "moe" and mode == "default":
            assert exp.experts.keys() == ref.experts.keys()
            for layer, rel in ref.experts.items():
                assert _close(exp.experts[layer], rel) <= TOL
    # the weights went back where accelerate keeps them
    still = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert still == meta


def test_meta_weights_without_loader_raise_naming_the_module():
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(_config("llama"))
    lin = model.model.layers[0].mlp.up_proj
    with pytest.raises(dlb.OffloadError, match="meta device"):
        fetch_param(lin, "weight")
    # a tape over such a model cannot even run its forward; the engine names the module
    from dlbhooks.engine import Engine
    from dlbhooks.records import Tape

    engine = Engine(Tape(model))
    with pytest.raises(dlb.OffloadError, match="model.layers.0.mlp.up_proj"):
        engine.param(lin, "weight")


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple):
        return tuple(_clone(o) for o in obj)
    if isinstance(obj, list):
        return [_clone(o) for o in obj]
    if isinstance(obj, dict):
        return type(obj)(**{k: _clone(v) for k, v in obj.items()}) if hasattr(obj, "to_tuple") \
            else {k: _clone(v) for k, v in obj.items()}
    return obj


def test_inputs_and_outputs_moved_between_devices_by_accelerate_hooks(saved):
    """Over several GPUs accelerate's hooks copy each block's inputs to the block's device
    inside its forward and (io_same_device) the outputs back. A hook that copies on the
    same device stands in for the move here: relevance must reach the originals."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Move(ModelHook):  # a device move, minus the device
        def pre_forward(self, module, *args, **kwargs):
            return _clone(args), _clone(kwargs)

        def post_forward(self, module, output):
            return _clone(output)

    kind, config, root, ids, refs, logits = saved
    model = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    moved = [model, *model.model.layers, model.lm_head]
    for m in moved:
        add_hook_to_module(m, Move())
    try:
        for mode, ref in refs.items():
            with dlb.trace(model) as tape:
                out = model(ids)
            assert torch.equal(out.logits, logits)
            assert tape.aliases, "the stand-in hooks copied nothing"
            exp = tape.explain(mode=mode)
            assert _close(exp.inputs["input_ids"], ref.inputs["input_ids"]) <= TOL
            for layer, rel in ref.experts.items():
                assert _close(exp.experts[layer], rel) <= TOL
    finally:
        for m in moved:
            remove_hook_from_module(m)


def test_generation_on_an_offloaded_model(saved, tmp_path):
    kind, config, root, ids, refs, logits = saved
    model = _load("disk", config, root, tmp_path).eval()
    ref_model = AutoModelForCausalLM.from_pretrained(root / "hf").eval()
    got = dlb.explain_generation(model, ids[:1], max_new_tokens=3, storage="cpu")
    want = dlb.explain_generation(ref_model, ids[:1], max_new_tokens=3)
    assert torch.equal(got.generated, want.generated)
    assert _close(got.matrix, want.matrix) <= TOL
