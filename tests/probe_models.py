"""Coverage probe: a registry of tiny architectures and one function that runs each of them.

Every probe builds one model deterministically (``torch.manual_seed``, random weights, no
network: transformers models from a config, torchvision models with ``weights=None``) in
float64 and eval mode, with inputs for ``model(**inputs)`` and the keyword arguments for
``tape.explain``. :func:`run_probe` runs the untraced forward, the traced forward and both
explanation modes, and records what happened (ok, a clean ``dlb.DLBError``, or a crash)
without raising: ``tests/test_coverage_probe.py`` asserts on the record and
``scripts/coverage_table.py`` writes it to ``docs/coverage.md``.

Results are cached per process (:func:`run_probe` is an ``lru_cache``): each model is built
once per session; the model itself is not kept (several torchvision models weigh hundreds of
MB in float64).
"""

from __future__ import annotations

import functools
import gc
import inspect
import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dlbhooks as dlb

DT = torch.float64
MODES = ("default", "contrastive")
CONSERVATION_TOL = 1e-12  # relative, float64
V = 64  # vocabulary of every text model
T = 7  # tokens per row
SEG = {"task": "segmentation", "thresholding": 0.0}


@dataclass
class Probe:
    """One model, its inputs and how to explain it.

    ``pad_input``/``pad_mask``: the input whose relevance must be exactly 0 where
    ``pad_mask`` (bool, shaped like that input) is True — ``None`` when the model takes no
    attention mask. ``output``: the output compared between the traced and the untraced
    forward (default: ``explain["output"]``, else ``logits``, else the first float tensor).
    """

    model: nn.Module
    inputs: dict[str, Tensor]
    explain: dict[str, Any] = field(default_factory=dict)
    source: str = "hand-written"
    pad_input: str | None = None
    pad_mask: Tensor | None = None
    output: str | int | None = None
    note: str = ""


class NotBuildable(Exception):
    """The architecture cannot be built in this environment (the reason is the message)."""


PROBES: dict[str, Callable[[], Probe]] = {}
SOURCES: dict[str, str] = {}  # name -> source, known even when the build fails


def probe(name: str, source: str) -> Callable[[Callable[[], Probe]], Callable[[], Probe]]:
    """Register a probe builder under ``name`` (``source``: transformers / torchvision /
    hand-written)."""

    def deco(fn: Callable[[], Probe]) -> Callable[[], Probe]:
        def build() -> Probe:
            p = fn()
            p.source = source
            return p

        build.__name__ = fn.__name__
        PROBES[name] = build
        SOURCES[name] = source
        return build
    return deco


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 1, scale: float = 1.0) -> Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=DT) * scale


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial γ, β and running statistics for every BatchNorm (as the suite does)."""
    g = gen(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and \
                m.running_mean is not None:
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


# -- transformers ---------------------------------------------------------------------------

DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
           pad_token_id=0)
ENC = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2,
           pad_token_id=0)
MOE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def text_batch(pad_id: int = 0, side: str = "right") -> tuple[Tensor, Tensor]:
    """2 × 7 token ids (3 ≤ id < 64); row 1 padded (2 tokens) on ``side``."""
    ids = torch.randint(3, V, (2, T), generator=gen(1))
    mask = torch.ones_like(ids)
    cols = slice(T - 2, T) if side == "right" else slice(0, 2)
    ids[1, cols] = pad_id
    mask[1, cols] = 0
    return ids, mask


def hf_model(cls: str, cfg: Any, perturb: str = "norm") -> nn.Module:
    """``transformers.<cls>`` from ``cfg`` with random weights, eager attention, float64,
    eval mode, no cache; biases and norm weights perturbed (``"norm"``: as
    tests/test_transformers.py, ``"moe"``: as tests/test_moe.py) so they are not trivial."""
    import transformers

    torch.manual_seed(0)
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    cfg._attn_implementation = "eager"
    model = getattr(transformers, cls)(cfg).to(DT).eval()
    if hasattr(model, "set_experts_implementation"):  # grouped_mm has no float64 kernel
        try:
            model.set_experts_implementation("eager")
        except (ValueError, NotImplementedError):
            pass  # no fused experts in this model
    with torch.no_grad():
        for n, p in model.named_parameters():
            if perturb == "moe" and (p.dim() == 1 or "bias" in n or "sinks" in n):
                p.add_(0.05 * torch.randn_like(p))
            elif perturb == "norm" and (n.endswith("bias") or "norm" in n.lower()):
                p.add_(0.1 * torch.randn_like(p))
    return model


def text_probe(cls: str, cfg: Any, pad_id: int = 0, side: str = "right",
               perturb: str = "norm", explain: dict | None = None, note: str = "",
               extra: dict[str, Tensor] | None = None) -> Probe:
    """A text model on a padded 2 × 7 batch (``input_ids`` + ``attention_mask``)."""
    cfg.num_labels = 3
    for attr, value in (("bos_token_id", 1), ("eos_token_id", 2)):  # inside the vocabulary
        old = getattr(cfg, attr, None)
        if isinstance(old, int) and old >= V or isinstance(old, list):
            setattr(cfg, attr, value)
    if cls.startswith("AutoModelFor"):
        cls = head_class(cls, cfg)
    model = hf_model(cls, cfg, perturb)
    ids, mask = text_batch(pad_id, side)
    inputs = {"input_ids": ids, "attention_mask": mask, **(extra or {})}
    return Probe(model, inputs, dict(explain or {}), pad_input="input_ids",
                 pad_mask=mask == 0, note=note)


def causal(cfg_cls: str, note: str = "", **kw: Any) -> Callable[[], Probe]:
    """A causal LM (``AutoModelForCausalLM``) from ``transformers.<cfg_cls>(**kw)``."""

    def build() -> Probe:
        import transformers

        cfg = getattr(transformers, cfg_cls)(**kw)
        return text_probe("AutoModelForCausalLM", cfg, note=note)
    return build


def head_class(head: str, cfg: Any) -> str:
    """The model class an ``AutoModelFor...`` head maps ``cfg`` to."""
    import transformers

    return getattr(transformers, head)._model_mapping[type(cfg)].__name__


def classifier(cfg_cls: str, pad_id: int = 0, side: str = "right", note: str = "",
               **kw: Any) -> Callable[[], Probe]:
    """A sequence classifier (3 labels) from ``transformers.<cfg_cls>(**kw)``."""

    def build() -> Probe:
        import transformers

        cfg = getattr(transformers, cfg_cls)(**kw)
        return text_probe("AutoModelForSequenceClassification", cfg, pad_id=pad_id, side=side,
                          note=note)
    return build


# decoders that dlbhooks lists as supported (README "Families")
probe("Llama", "transformers")(causal("LlamaConfig", **DEC))
probe("Mistral", "transformers")(causal("MistralConfig", **DEC, sliding_window=4))
probe("Qwen2", "transformers")(causal("Qwen2Config", **DEC))
probe("Qwen3", "transformers")(causal("Qwen3Config", **DEC, head_dim=8))
probe("Gemma2", "transformers")(causal("Gemma2Config", **DEC, head_dim=8,
                                       query_pre_attn_scalar=8, sliding_window=4))
probe("Gemma3 (text)", "transformers")(causal("Gemma3TextConfig", **DEC, head_dim=8,
                                              query_pre_attn_scalar=8, sliding_window=4))
probe("Phi3", "transformers")(causal(
    "Phi3Config", **DEC, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                          "partial_rotary_factor": 0.5}))
probe("GPT-2", "transformers")(causal("GPT2Config", vocab_size=V, n_embd=32, n_layer=2,
                                      n_head=4, n_positions=64, pad_token_id=0))

# decoders not listed as supported
probe("OLMo", "transformers")(causal("OlmoConfig", **DEC))
probe("OLMo2", "transformers")(causal("Olmo2Config", **DEC))
probe("Phi (Phi-2)", "transformers")(causal(
    "PhiConfig", **DEC, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                         "partial_rotary_factor": 0.5}))
probe("GPT-NeoX", "transformers")(causal(
    "GPTNeoXConfig", vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
    rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}))
probe("Falcon", "transformers")(causal(
    "FalconConfig", vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64, pad_token_id=0, bias=True,
    note="Falcon-7B layout: multi-query, parallel attention + MLP, rotary"))
probe("StableLM", "transformers")(causal("StableLmConfig", **DEC))
probe("StarCoder2", "transformers")(causal("Starcoder2Config", **DEC, sliding_window=4))
probe("OPT", "transformers")(causal(
    "OPTConfig", vocab_size=V, hidden_size=32, ffn_dim=48, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0,
    dropout=0.0))
probe("Bloom", "transformers")(causal("BloomConfig", vocab_size=V, hidden_size=32, n_layer=2,
                                      n_head=4, pad_token_id=0))
probe("GPT-J", "transformers")(causal("GPTJConfig", vocab_size=V, n_positions=64, n_embd=32,
                                      n_layer=2, n_head=4, rotary_dim=4, pad_token_id=0))
probe("Granite", "transformers")(causal(
    "GraniteConfig", **DEC, embedding_multiplier=2.0, logits_scaling=4.0,
    residual_multiplier=0.5, attention_multiplier=0.25))
probe("Cohere", "transformers")(causal("CohereConfig", **DEC))
probe("SmolLM3", "transformers")(causal("SmolLM3Config", **DEC, no_rope_layer_interval=2))


def deepseek(cfg_cls: str, note: str) -> Callable[[], Probe]:
    """DeepSeek-V2/V3 (the same small MLA + MoE layout; the routers differ)."""

    def build() -> Probe:
        import transformers

        cfg = getattr(transformers, cfg_cls)(
            **{**MOE, "num_key_value_heads": 4}, intermediate_size=48,
            moe_intermediate_size=16, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4,
            qk_nope_head_dim=4, v_head_dim=8, n_routed_experts=4, n_shared_experts=1,
            num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1)
        return text_probe("AutoModelForCausalLM", cfg, perturb="moe", note=note)
    return build


probe("DeepSeek-V2", "transformers")(deepseek(
    "DeepseekV2Config", "MLA attention (LoRA q/kv), layer 0 dense, layer 1 MoE"))
probe("DeepSeek-V3", "transformers")(deepseek(
    "DeepseekV3Config", "MLA attention, sigmoid router with bias, layer 1 MoE"))


@probe("Llama 4 (text)", "transformers")
def _llama4() -> Probe:
    import transformers as t

    cfg = t.Llama4TextConfig(
        **MOE, head_dim=8, intermediate_size=16, intermediate_size_mlp=48,
        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
        attention_chunk_size=4, no_rope_layer_interval=2)
    return text_probe("Llama4ForCausalLM", cfg, perturb="moe",
                      note="layer 1 MoE (4 experts + shared), chunked attention, NoPE layer")


# MoE families dlbhooks lists as supported (configs as tests/test_moe.py)
def moe(cfg_cls: str, **kw: Any) -> Callable[[], Probe]:
    def build() -> Probe:
        import transformers

        cfg = getattr(transformers, cfg_cls)(**MOE, **kw)
        return text_probe("AutoModelForCausalLM", cfg, perturb="moe")
    return build


probe("Qwen3-MoE", "transformers")(moe(
    "Qwen3MoeConfig", head_dim=8, intermediate_size=48, moe_intermediate_size=16,
    num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1))
probe("OLMoE", "transformers")(moe("OlmoeConfig", intermediate_size=16, num_experts=4,
                                   num_experts_per_tok=2))
probe("Mixtral", "transformers")(moe("MixtralConfig", intermediate_size=16,
                                     num_local_experts=4, num_experts_per_tok=2))
probe("Qwen2-MoE", "transformers")(moe(
    "Qwen2MoeConfig", intermediate_size=48, moe_intermediate_size=16,
    shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2))
probe("GPT-OSS", "transformers")(moe(
    "GptOssConfig", head_dim=8, intermediate_size=16, num_local_experts=4,
    num_experts_per_tok=2, sliding_window=4,
    rope_parameters={"rope_type": "default", "rope_theta": 1e4}))


@probe("GraniteMoE", "transformers")
def _granitemoe() -> Probe:
    import transformers

    cfg = transformers.GraniteMoeConfig(**MOE, intermediate_size=16, num_local_experts=4,
                                        num_experts_per_tok=2)
    # float64: the default grouped-mm experts kernel takes no doubles; eager is the same maths
    cfg.experts_implementation = cfg._experts_implementation = "eager"
    return text_probe("AutoModelForCausalLM", cfg, perturb="moe")


@probe("JetMoE", "transformers")
def _jetmoe() -> Probe:
    import transformers as t

    cfg = t.JetMoeConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                         num_key_value_heads=2, kv_channels=8, intermediate_size=16,
                         max_position_embeddings=64, num_local_experts=4,
                         num_experts_per_tok=2, pad_token_id=0)
    p = text_probe("JetMoeForCausalLM", cfg, perturb="moe")
    with torch.no_grad():  # as tests/test_jetmoe.py: initializer_range 0.01 is tiny
        for n, w in p.model.named_parameters():
            if "input_linear" in n or "output_linear" in n:
                w.mul_(20)
    return p


# encoders
probe("BERT", "transformers")(classifier("BertConfig", **ENC))
probe("RoBERTa", "transformers")(classifier("RobertaConfig", pad_id=1,
                                            **{**ENC, "pad_token_id": 1}))
probe("ELECTRA", "transformers")(classifier("ElectraConfig", **ENC, embedding_size=16))
probe("ALBERT", "transformers")(classifier("AlbertConfig", **ENC, embedding_size=16))
probe("DistilBERT", "transformers")(classifier(
    "DistilBertConfig", vocab_size=V, dim=32, hidden_dim=48, n_layers=2, n_heads=4,
    max_position_embeddings=64, pad_token_id=0))
probe("DeBERTa-v2", "transformers")(classifier(
    "DebertaV2Config", **{**ENC, "type_vocab_size": 0}, relative_attention=True,
    max_relative_positions=16, position_buckets=8, pos_att_type=["p2c", "c2p"],
    position_biased_input=False, pooler_hidden_size=32,
    note="DeBERTa-v3 layout: disentangled relative attention (c2p, p2c)"))
probe("ModernBERT", "transformers")(classifier(
    "ModernBertConfig", vocab_size=V, hidden_size=32, intermediate_size=48,
    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, pad_token_id=0,
    local_attention=4, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2))
probe("XLNet", "transformers")(classifier(
    "XLNetConfig", side="left", vocab_size=V, d_model=32, n_layer=2, n_head=4, d_inner=48,
    pad_token_id=0, mem_len=None, dropout=0.0,
    note="left-padded (XLNet's tokenizer pads on the left; the summary takes the last token)"))


def seq2seq(cls: str, cfg: Any, note: str = "") -> Probe:
    """An encoder-decoder on a padded 2 × 7 source and 2 × 4 decoder ids; the last decoder
    position is explained."""
    dec = torch.randint(3, V, (2, 4), generator=gen(2))
    return text_probe(cls, cfg, explain={"position": -1}, note=note,
                      extra={"decoder_input_ids": dec})


@probe("T5", "transformers")
def _t5() -> Probe:
    import transformers as t

    cfg = t.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16,
                     dropout_rate=0.0, pad_token_id=0, decoder_start_token_id=0)
    return seq2seq("T5ForConditionalGeneration", cfg)


@probe("BART", "transformers")
def _bart() -> Probe:
    import transformers as t

    cfg = t.BartConfig(vocab_size=V, max_position_embeddings=64, encoder_layers=2,
                       encoder_ffn_dim=48, encoder_attention_heads=4, decoder_layers=2,
                       decoder_ffn_dim=48, decoder_attention_heads=4, d_model=32, dropout=0.0,
                       pad_token_id=1, bos_token_id=0, eos_token_id=2,
                       decoder_start_token_id=2, forced_eos_token_id=None)
    return seq2seq("BartForConditionalGeneration", cfg)


@probe("Whisper", "transformers")
def _whisper() -> Probe:
    import transformers as t

    cfg = t.WhisperConfig(vocab_size=V, num_mel_bins=8, encoder_layers=2,
                          encoder_attention_heads=2, decoder_layers=2, decoder_attention_heads=2,
                          decoder_ffn_dim=32, encoder_ffn_dim=32, d_model=16,
                          max_source_positions=8, max_target_positions=16, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                          begin_suppress_tokens=None)
    model = hf_model("WhisperForConditionalGeneration", cfg)
    inputs = {"input_features": randn(2, 8, 16),
              "decoder_input_ids": torch.randint(3, V, (2, 4), generator=gen(2))}
    return Probe(model, inputs, {"position": -1},
                 note="no padding check: input_features take no attention mask")


@probe("ViT", "transformers")
def _vit_hf() -> Probe:
    import transformers as t

    cfg = t.ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, image_size=32, patch_size=8, num_labels=3)
    return Probe(hf_model("ViTForImageClassification", cfg), {"pixel_values": randn(2, 3, 32, 32)})


def _clip_config() -> Any:
    import transformers as t

    text = dict(vocab_size=V, hidden_size=16, intermediate_size=32, projection_dim=16,
                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=16, intermediate_size=32, projection_dim=16, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)
    return t.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@probe("CLIP (vision, image_embeds)", "transformers")
def _clip_vision() -> Probe:
    cfg = _clip_config().vision_config
    model = hf_model("CLIPVisionModelWithProjection", cfg)
    return Probe(model, {"pixel_values": randn(2, 3, 32, 32)}, {"output": "image_embeds"},
                 note="CLIPVisionModelWithProjection; seed: the largest embedding unit")


@probe("CLIP (dual encoder, logits_per_image)", "transformers")
def _clip_dual() -> Probe:
    model = hf_model("CLIPModel", _clip_config())
    ids, mask = text_batch()
    ids[:, -1] = 2  # the pooled text token is the first eos (argmax of ids == eos)
    ids[1, -3] = 2  # (row 1: right before its padding)
    ids[1, -1] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": randn(2, 3, 32, 32)}
    return Probe(model, inputs, {"output": "logits_per_image"}, pad_input="input_ids",
                 pad_mask=mask == 0, note="CLIPModel: 2 images × 2 texts")


# -- torchvision ----------------------------------------------------------------------------


def tv(build: Callable[[], nn.Module], size: int = 32, batch: int = 2,
       explain: dict | None = None, note: str = "") -> Callable[[], Probe]:
    """A torchvision-style model on ``batch`` random ``size`` × ``size`` RGB images."""

    def make() -> Probe:
        torch.manual_seed(0)
        model = randomise_bn(build()).to(DT).eval()
        arg = next(iter(inspect.signature(model.forward).parameters))  # x, or input (LRASPP)
        return Probe(model, {arg: randn(batch, 3, size, size)}, dict(explain or {}), note=note)
    return make


def _tvm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kw)
    return build


def _seg(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models.segmentation, name)(
            weights=None, weights_backbone=None, num_classes=3, aux_loss=False, **kw)
    return build


def _vit_tv() -> nn.Module:
    import torchvision

    m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                             num_heads=2, hidden_dim=16, mlp_dim=32,
                                             num_classes=3)
    with torch.no_grad():  # torchvision zero-initialises the head, class token and biases
        for name, p in m.named_parameters():
            if name.endswith("bias") or name in ("class_token", "heads.head.weight"):
                p.normal_(0, 0.3)
    return m


probe("ResNet-18", "torchvision")(tv(_tvm("resnet18", num_classes=3)))
probe("VGG-11", "torchvision")(tv(_tvm("vgg11", num_classes=3), batch=1))
probe("DenseNet-121", "torchvision")(tv(_tvm("densenet121", num_classes=3), batch=1))
probe("MobileNet V2", "torchvision")(tv(_tvm("mobilenet_v2", num_classes=3)))
probe("MobileNet V3 small", "torchvision")(tv(_tvm("mobilenet_v3_small", num_classes=3)))
probe("EfficientNet-B0", "torchvision")(tv(_tvm("efficientnet_b0", num_classes=3)))
probe("ViT (torchvision, tiny)", "torchvision")(tv(
    _vit_tv, note="VisionTransformer(image_size=32, patch_size=8, 2 layers, hidden 16)"))
probe("FCN (ResNet-50)", "torchvision")(tv(
    _seg("fcn_resnet50"), batch=1, explain={"output": "out", **SEG}))
probe("DeepLabV3 (ResNet-50)", "torchvision")(tv(
    _seg("deeplabv3_resnet50"), batch=1, explain={"output": "out", **SEG}))
probe("LRASPP (MobileNet V3 large)", "torchvision")(tv(
    _seg("lraspp_mobilenet_v3_large"), batch=1, explain={"output": "out", **SEG}))
probe("ConvNeXt tiny", "torchvision")(tv(_tvm("convnext_tiny", num_classes=3), batch=1))
probe("Swin-T", "torchvision")(tv(_tvm("swin_t", num_classes=3), batch=1))
probe("RegNet Y-400MF", "torchvision")(tv(_tvm("regnet_y_400mf", num_classes=3)))
probe("SqueezeNet 1.1", "torchvision")(tv(_tvm("squeezenet1_1", num_classes=3)))
probe("ShuffleNet V2 x0.5", "torchvision")(tv(_tvm("shufflenet_v2_x0_5", num_classes=3)))
probe("Inception v3", "torchvision")(tv(
    _tvm("inception_v3", num_classes=3, aux_logits=False, init_weights=True), size=75,
    batch=1, note="75 × 75: the smallest input Inception v3 accepts"))
probe("GoogLeNet", "torchvision")(tv(
    _tvm("googlenet", num_classes=3, aux_logits=False, init_weights=True), batch=1))
probe("MNASNet 0.5", "torchvision")(tv(_tvm("mnasnet0_5", num_classes=3)))


# -- hand-written -----------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """The classic tutorial CNN: functional relu / max-pool and ``x.view``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class LSTMClassifier(nn.Module):
    """Embedding -> LSTM -> last hidden state -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, input_ids: Tensor) -> Tensor:
        _, (h, _) = self.lstm(self.emb(input_ids))
        return self.fc(h[-1])


class GRUNet(nn.Module):
    """GRU (2 layers) over a float sequence -> last step -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(4, 16, num_layers=2, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x)
        return self.fc(out[:, -1])


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    """A two-level UNet: conv blocks, max-pool down, ConvTranspose and ``F.interpolate`` up,
    ``torch.cat`` skips, 1 × 1 conv to 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2, self.mid = conv_block(3, 8), conv_block(8, 16), conv_block(16, 32)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.dec2 = conv_block(32, 16)
        self.reduce1 = nn.Conv2d(16, 8, 1)
        self.dec1 = conv_block(16, 8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        u1 = self.reduce1(F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False))
        d1 = self.dec1(torch.cat([u1, e1], dim=1))
        return self.head(d1)


class EncoderLayerNet(nn.Module):
    """Embedding -> nn.TransformerEncoderLayer -> mean over tokens -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.layer(self.emb(input_ids)).mean(dim=1))


def hand(make: Callable[[], nn.Module], inputs: Callable[[], dict[str, Tensor]],
         explain: dict | None = None, note: str = "") -> Callable[[], Probe]:
    def build() -> Probe:
        torch.manual_seed(0)
        model = randomise_bn(make()).to(DT).eval()
        return Probe(model, inputs(), dict(explain or {}), note=note)
    return build


def _ids() -> dict[str, Tensor]:
    return {"input_ids": text_batch()[0].clamp(min=3)}


probe("MLP", "hand-written")(hand(
    lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 3)),
    lambda: {"input": randn(4, 6, scale=2.0)}))
probe("CNN (F.relu, F.max_pool2d, view)", "hand-written")(hand(
    SmallCNN, lambda: {"x": randn(2, 3, 32, 32)}))
probe("LSTM classifier", "hand-written")(hand(LSTMClassifier, _ids))
probe("GRU", "hand-written")(hand(GRUNet, lambda: {"x": randn(2, 6, 4, scale=1.5)}))
probe("UNet", "hand-written")(hand(UNet, lambda: {"x": randn(1, 3, 32, 32)}, SEG))
probe("nn.TransformerEncoderLayer", "hand-written")(hand(
    EncoderLayerNet, _ids, note="embedding + encoder layer + mean-pool + linear head"))


# -- running a probe ------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one step (traced forward, or one explanation mode) did."""

    status: str  # "ok" | "error"
    error: str = ""  # exception class name
    message: str = ""  # the full message
    dlb_error: bool = False  # a dlb.DLBError subclass (else: a crash)
    located: bool = False  # the message names a module path or an operation
    trace: str = ""  # traceback of a crash
    record: str = ""  # the innermost dlbhooks record being processed when it was raised
    conservation: float | None = None
    pad_zero: bool | None = None  # None: no padding check
    pad_max: float = 0.0
    seconds: float = 0.0

    @property
    def first_line(self) -> str:
        return self.message.strip().splitlines()[0] if self.message.strip() else ""


@dataclass
class Result:
    name: str
    source: str
    note: str = ""
    not_buildable: str = ""  # reason (NotBuildable)
    build_crash: str = ""  # any other exception while building (a probe bug)
    untraced_crash: str = ""  # the untraced forward raised (a probe bug)
    forward: Outcome | None = None  # the traced forward
    traced_equal: bool | None = None
    traced_diff: float = 0.0
    modes: dict[str, Outcome] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def working(self) -> bool:
        return (not self.not_buildable and not self.build_crash and bool(self.traced_equal)
                and len(self.modes) == len(MODES)
                and all(o.status == "ok" and o.conservation is not None
                        and o.conservation <= CONSERVATION_TOL and o.pad_zero is not False
                        for o in self.modes.values()))

    @property
    def failure(self) -> Outcome | None:
        """The first failed step (the traced forward or a mode), if any."""
        steps = [self.forward, *self.modes.values()]
        return next((o for o in steps if o is not None and o.status != "ok"), None)


def main_output(out: Any, which: str | int | None) -> Tensor:
    """The output tensor compared between traced and untraced forwards."""
    if isinstance(out, Tensor):
        return out
    if isinstance(which, int):
        return out[which]
    if isinstance(out, dict):  # ModelOutput and torchvision's OrderedDict
        if which is not None:
            return out[which]
        if out.get("logits") is not None:
            return out["logits"]
        values = list(out.values())
    else:
        values = list(out)
    return next(v for v in values if isinstance(v, Tensor) and v.is_floating_point())


_OPERATION = re.compile(r"torch function|\b(?:torch|F|aten|Tensor)\.\w+|\bfunctional code\b")


def names_location(message: str, model: nn.Module) -> bool:
    """Whether ``message`` names a module path (quoted, as dlbhooks's errors do), a module
    class of the model, or a torch operation."""
    if _OPERATION.search(message) or "'<root>'" in message:
        return True
    for path, m in model.named_modules():
        if (path and f"'{path}" in message) or re.search(rf"\b{type(m).__name__}\b", message):
            return True
    return False


def _innermost_record(err: BaseException) -> str:
    """``describe()`` of the last record a dlbhooks frame was working on (a local ``rec``)."""
    found, tb = "", err.__traceback__
    while tb is not None:
        rec = tb.tb_frame.f_locals.get("rec")
        if hasattr(rec, "describe") and hasattr(rec, "path"):
            found = rec.describe()
        tb = tb.tb_next
    return found


def _failure(err: BaseException, model: nn.Module, t0: float) -> Outcome:
    msg = str(err) or repr(err)
    is_dlb = isinstance(err, dlb.DLBError)
    return Outcome("error", type(err).__name__, msg, is_dlb, names_location(msg, model),
                   "" if is_dlb else traceback.format_exc(), _innermost_record(err),
                   seconds=time.perf_counter() - t0)


def _explain(tape: Any, p: Probe, mode: str) -> Outcome:
    t0 = time.perf_counter()
    try:
        exp = tape.explain(mode=mode, **p.explain)
        err = exp.conservation_error()
    except Exception as e:  # noqa: BLE001 - recorded, asserted on by the test
        return _failure(e, p.model, t0)
    o = Outcome("ok", conservation=float(err), seconds=time.perf_counter() - t0)
    if err > CONSERVATION_TOL:
        o.record = _leak(exp)
    if p.pad_input is not None:
        streams = [exp.inputs] + ([exp.positive, exp.negative] if exp.positive else [])
        pads = [s[p.pad_input][p.pad_mask] for s in streams]
        o.pad_max = max(float(r.abs().max()) if r.numel() else 0.0 for r in pads)
        o.pad_zero = o.pad_max == 0.0
    return o


def _leak(exp: Any) -> str:
    """The innermost ledger entry that loses relevance (violations add up towards the root,
    so the deepest entry with a violation of the same size is where it starts)."""

    def pairs(x: Any) -> tuple:
        return x if isinstance(x, tuple) else (x,)

    def err(e: Any) -> float:
        return max(abs(o - i - a) for o, i, a in zip(pairs(e.relevance_out),
                                                     pairs(e.relevance_in),
                                                     pairs(e.absorbed_inside)))

    worst = max(err(e) for e in exp.ledger)
    e = [e for e in exp.ledger if err(e) >= 0.5 * worst][-1]
    seeded = max(map(abs, pairs(exp.ledger[0].relevance_out)))
    return f"'{e.path}' ({e.type}) loses {err(e):.3g} of {seeded:g}"


def _build(name: str, r: Result) -> Probe | None:
    try:
        p = PROBES[name]()
    except NotBuildable as e:
        r.not_buildable = str(e)
        return None
    except Exception as e:  # noqa: BLE001
        r.build_crash = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        return None
    r.note = p.note
    return p


@functools.cache
def run_probe(name: str) -> Result:
    """Build ``name``'s model, run it untraced and traced, explain it in both modes."""
    t0 = time.perf_counter()
    r = Result(name, SOURCES[name])
    p = _build(name, r)
    if p is None:
        r.seconds = time.perf_counter() - t0
        return r
    which = p.output if p.output is not None else p.explain.get("output")
    try:
        with torch.no_grad():
            ref = main_output(p.model(**p.inputs), which).clone()
    except Exception as e:  # noqa: BLE001
        r.untraced_crash = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        r.seconds = time.perf_counter() - t0
        return r
    t1 = time.perf_counter()
    try:
        with dlb.trace(p.model) as tape:
            got = main_output(p.model(**p.inputs), which)
        r.forward = Outcome("ok", seconds=time.perf_counter() - t1)
    except Exception as e:  # noqa: BLE001
        r.forward = _failure(e, p.model, t1)
    else:
        r.traced_equal = bool(torch.equal(got, ref))
        if not r.traced_equal and got.shape == ref.shape:
            r.traced_diff = float((got - ref).abs().nan_to_num(float("inf")).max())
        for mode in MODES:
            r.modes[mode] = _explain(tape, p, mode)
    r.seconds = time.perf_counter() - t0
    p = tape = None  # type: ignore[assignment]
    gc.collect()  # the model goes now (cycles): its weights leave memory and the |W| cache
    return r


def versions() -> dict[str, str]:
    import platform

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "torchvision"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "not installed"
    return out


# -- reporting ------------------------------------------------------------------------------

_PATTERNS = [  # (regex on the message, how to name what it points at)
    (re.compile(r"result of (\S+) \(torch function [^)]*\) called in '([^']*)' \(([\w.]+)\)"),
     "{0} in {1} ({2})"),
    (re.compile(r"no relevance rule for '([^']*)' \(([\w.]+)\)"), "no rule: {0} ({1})"),
    (re.compile(r"the rule for '([^']*)' \(([\w.]+)\) returned (\d+) relevances for (\d+)"),
     "{0} ({1}): rule gives {2} relevance for {3} inputs"),
    (re.compile(r"functional code in '([^']*)' \(([\w.]+)\)"), "functional code in {0} ({1})"),
    (re.compile(r"output of '([^']*)' \(([\w.]+)\)"), "output of {0} ({1})"),
    (re.compile(r"'([^']*)' \(([\w.]+)\)"), "{0} ({1})"),
]


def _short(name: str) -> str:
    """``pkg.module.ClassName`` -> ``ClassName``; module paths and function names as they are."""
    last = name.rsplit(".", 1)[-1]
    return last if "." in name and last[:1].isupper() else name


def where(o: Outcome) -> str:
    """The operation or module an error names, compactly (class names without modules)."""
    for rx, fmt in _PATTERNS:
        m = rx.search(o.message)
        if m:
            return fmt.format(*[_short(g) if g else "<root>" for g in m.groups()])
    return re.sub(r"called at \S*?([^/\s]+:\d+)", r"called at \1", o.record)


def category(o: Outcome) -> str:
    """What a failure is about, independent of the model: the error class and the operation
    or the module type it names."""
    m = re.search(r"result of (\S+) \(torch function", o.message)
    if m:
        return f"{o.error}: torch function {m.group(1)}"
    m = re.search(r"no relevance rule for '[^']*' \(([\w.]+)\)", o.message)
    if m:
        kind = _short(m.group(1))
        return f"{o.error}: no rule for " + ("*RotaryEmbedding" if kind.endswith(
            "RotaryEmbedding") else kind)
    if "relevances for" in o.message:
        return f"{o.error}: position-embedding module with 2 tensor inputs"
    m = re.search(r"functional code in '[^']*' \(([\w.]+)\)", o.message)
    if m:
        return f"{o.error}: functional code in {_short(m.group(1))}"
    m = re.search(r"reached the output of '[^']*' \(([\w.]+)\)", o.message)
    if m:
        return f"{o.error}: functional code in {_short(m.group(1))} (its output)"
    if not o.dlb_error:
        rec = re.search(r"torch function (\w+)", o.record)
        return f"crash ({o.error})" + (f" in the {rec.group(1)} rule" if rec else "")
    return o.error


def first_line(o: Outcome, limit: int = 120) -> str:
    line = o.first_line
    return line if len(line) <= limit else line[: limit - 1] + "…"


def mode_status(r: Result, mode: str) -> str:
    """``ok``, ``not buildable``, the error class (``crash: X`` for a non-dlbhooks error),
    ``lost relevance`` (conservation over the tolerance) or ``padding ≠ 0``."""
    if r.not_buildable:
        return "not buildable"
    if r.build_crash or r.untraced_crash:
        return "probe error"
    o = r.forward if r.forward is not None and r.forward.status != "ok" else r.modes.get(mode)
    if o is None:
        return "not run"
    if o.status != "ok":
        return o.error if o.dlb_error else f"crash: {o.error}"
    if not r.traced_equal:
        return "output changed"
    if o.conservation is None or o.conservation > CONSERVATION_TOL:
        return "lost relevance"
    if o.pad_zero is False:
        return "padding ≠ 0"
    return "ok"


def conservation(r: Result) -> float | None:
    """The largest conservation error over the modes that ran."""
    errs = [o.conservation for o in r.modes.values() if o.conservation is not None]
    return max(errs) if errs else None


def describe_failure(r: Result, limit: int = 120) -> tuple[str, str, str]:
    """(error class, the operation or module named, first line of the message) of a probe
    that does not work; empty strings for one that does."""
    if r.working:
        return "", "", ""
    if r.not_buildable:
        return "not buildable", "", r.not_buildable[:limit]
    if r.build_crash or r.untraced_crash:
        return "probe error", "", (r.build_crash or r.untraced_crash).splitlines()[0][:limit]
    f = r.failure
    if f is not None:
        return (f.error if f.dlb_error else f"{f.error} (crash)"), where(f), first_line(f, limit)
    if not r.traced_equal:
        return "—", "", f"tracing changed the output (max |difference| {r.traced_diff:.3g})"
    bad = [o for o in r.modes.values()
           if o.conservation is None or o.conservation > CONSERVATION_TOL]
    if bad:
        return "— (lost relevance)", bad[0].record, \
            f"relative conservation error {conservation(r):.3g} > {CONSERVATION_TOL:g}"
    pad = max(o.pad_max for o in r.modes.values())
    return "— (padding)", "", f"padded positions get relevance (max |R| {pad:.3g})"


def failure_category(r: Result) -> str:
    """What a non-working probe's failure is about (for grouping), '' if it works."""
    if r.working:
        return ""
    if r.not_buildable or r.build_crash or r.untraced_crash:
        return "not buildable" if r.not_buildable else "probe error"
    f = r.failure
    if f is not None:
        return category(f)
    cls, named, _ = describe_failure(r)
    if "lost relevance" in cls:
        op = re.search(r"\(([^)]*)\) loses", named)
        return f"lost relevance in {op.group(1) if op else '?'}"
    return cls
