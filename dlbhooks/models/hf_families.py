"""Hugging Face transformers families as data.

Each entry maps a transformers class (by dotted name, so importing dlbhooks never imports
transformers) to a rule: a leaf rule (Conv1D, activations, RMSNorms, rotary tables) or a
:class:`~dlbhooks.rules.functional.Functional` composite that spells out the functional
maths of its ``forward`` (residual adds, gated products, RoPE, embedding sums, pooling).
A family that looks like Llama is a few lines here; see README, "Adding a family".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..rules.composite import matmul_adj, matmul_fwd
from ..rules.contract import RuleContext, RuleResult
from ..rules.core import weighted_sum
from ..rules.elementwise import passthrough_rule, register_saturation
from ..rules.experts import SharedExpert, router_rule, shared_expert_moe
from ..rules.functional import (
    Add,
    Arg,
    Chunk,
    First,
    Functional,
    Gather,
    Heads,
    In,
    Mul,
    Opt,
    Out,
    Ret,
    Rope,
    Tmp,
    Unary,
)
from ..rules.linear import exact_output
from ..rules.norm import rms_norm_rule
from ..rules.registry import register_rule
from .hf_attention import CHILD as ATTN
from .jetmoe import (
    MixtureOfAttention,
    ScatteredExperts,
    mixture_of_attention,
    parallel_experts_rule,
    scattered_moe,
)

if TYPE_CHECKING:
    from ..records import Record

M = "transformers.models"

# -- leaf modules -------------------------------------------------------------------------


def conv1d_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """GPT-2's ``Conv1D``: ``y = x @ W + b`` with W [in, out] (§2)."""
    m = rec.module
    W, b = ctx.param(m, "weight"), ctx.param(m, "bias")
    out = exact_output(rec, ctx)
    R, absorbed = weighted_sum(
        R_out[0], rec.input_value(0), W, b, matmul_fwd, matmul_adj,
        bounds=ctx.bounds_after(rec), output=out,
    )
    return RuleResult([R], absorbed)


def constant_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """Modules whose outputs are constants for relevance (rotary cos/sin tables)."""
    R = R_out[0] if R_out else None
    if R is not None and float(R.abs().sum()):
        raise ValueError(f"relevance reached {rec.describe()}, whose outputs are constants")
    return RuleResult([None] * len(rec.inputs))


register_rule("transformers.pytorch_utils.Conv1D", conv1d_rule, name="conv1d")

ACTIVATIONS = [
    "GELUActivation", "NewGELUActivation", "FastGELUActivation", "QuickGELUActivation",
    "GELUTanh", "ClippedGELUActivation", "AccurateGELUActivation", "SiLUActivation",
    "MishActivation", "LinearActivation", "LaplaceActivation", "ReLUSquaredActivation",
    "PytorchGELUTanh", "GELUPytorchTanh", "XIELUActivation",
]
for _name in ACTIVATIONS:
    register_rule(f"transformers.activations.{_name}", passthrough_rule,
                  name="passthrough")
# transformers' SiLU saturates like torch's nn.SiLU (METHOD.md §2)
register_saturation("transformers.activations.SiLUActivation", -6.0, None)

#: family module -> class prefix, for the classes every Llama-like family defines
LLAMA_LIKE = {
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
    "gemma2": "Gemma2", "gemma3": "Gemma3", "phi3": "Phi3",
    # mixture-of-experts families (experts and routers: rules/experts.py)
    "qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe", "mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe",
    "gpt_oss": "GptOss",
}
for _mod, _cls in LLAMA_LIKE.items():
    _base = f"{M}.{_mod}.modeling_{_mod}.{_cls}"
    register_rule(f"{_base}RMSNorm", rms_norm_rule, name="rms_norm")
    register_rule(f"{_base}RotaryEmbedding", constant_rule, name="constant")
register_rule(f"{M}.gemma3.modeling_gemma3.Gemma3RotaryEmbedding", constant_rule, name="constant")

# -- composites ---------------------------------------------------------------------------


def pre_norm_layer(attn_norm: str, attn: str, mlp_norm: str, mlp: str) -> Functional:
    """``h = x + attn(...)``; ``out = h + mlp(mlp_norm(h))`` (the branch ends are ``attn``
    and ``mlp``; ``mlp_norm`` is the first module to read ``h``)."""
    return Functional(
        Add(Ret(0), (In(mlp_norm), Out(mlp)), names=("residual", "mlp")),
        Add(In(mlp_norm), (Arg(0), Out(attn)), names=("residual", "attention")),
        name="residual_layer",
    )


def gated_mlp(act: str = "act_fn", up: str = "up_proj", down: str = "down_proj") -> Functional:
    """``down(act(gate(x)) * up(x))``: the product rule between the two branches."""
    return Functional(Mul(In(down), (Out(act), Out(up))), name="gated_mlp")


def rope_attention(q: Heads | Out, k: Heads | Out) -> Functional:
    """RoPE between the recorded pre-rotation heads and the attention call's Q and K."""
    return Functional(Rope(In(ATTN, 0), q), Rope(In(ATTN, 1), k), name="rope_attention")


def _heads(src: str, which: int, after: tuple = ()) -> Heads:
    return Heads(Out(src), In(ATTN, which), after)


STANDARD_ATTENTION = rope_attention(_heads("q_proj", 0), _heads("k_proj", 1))

COMPOSITES: dict[str, Functional] = {}
for _mod, _cls in LLAMA_LIKE.items():
    _base = f"{M}.{_mod}.modeling_{_mod}.{_cls}"
    COMPOSITES[f"{_base}MLP"] = gated_mlp()
    COMPOSITES[f"{_base}Attention"] = STANDARD_ATTENTION
    COMPOSITES[f"{_base}DecoderLayer"] = pre_norm_layer(
        "input_layernorm", "self_attn", "post_attention_layernorm", "mlp")

# Qwen3: q/k RMSNorm per head on [b, s, h, d], before RoPE
COMPOSITES[f"{M}.qwen3.modeling_qwen3.Qwen3Attention"] = rope_attention(
    _heads("q_norm", 0), _heads("k_norm", 1))
COMPOSITES[f"{M}.qwen3_moe.modeling_qwen3_moe.Qwen3MoeAttention"] = rope_attention(
    _heads("q_norm", 0), _heads("k_norm", 1))
# OLMoE normalises the whole q / k projection ([b, s, heads·d]) before RoPE
COMPOSITES[f"{M}.olmoe.modeling_olmoe.OlmoeAttention"] = rope_attention(
    _heads("q_norm", 0), _heads("k_norm", 1))
# GPT-OSS: RoPE with one cos/sin per pair; sinks are recorded by the attention function
COMPOSITES[f"{M}.gpt_oss.modeling_gpt_oss.GptOssAttention"] = Functional(
    Rope(In(ATTN, 0), _heads("q_proj", 0), half_cos=True),
    Rope(In(ATTN, 1), _heads("k_proj", 1), half_cos=True), name="rope_attention")
# Qwen2-MoE: routed experts + a sigmoid-gated shared expert (its gate is a routing weight),
# split in one step (rules/experts.py)
COMPOSITES[f"{M}.qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock"] = shared_expert_moe(
    SharedExpert(experts="experts", shared="shared_expert", gate="shared_expert_gate",
                 label="shared"))
# JetMoE: scattered experts (JetMoeParallelExperts) in the MLP and in attention (mixture of
# attention heads: the MoA's map/reduce are plain methods; models/jetmoe.py)
_J = f"{M}.jetmoe.modeling_jetmoe.JetMoe"
register_rule(f"{_J}RMSNorm", rms_norm_rule, name="rms_norm")
register_rule(f"{_J}RotaryEmbedding", constant_rule, name="constant")
register_rule(f"{_J}ParallelExperts", parallel_experts_rule, name="parallel_experts")
register_rule(f"{_J}TopKGating", router_rule, name="router")
COMPOSITES[f"{_J}MoE"] = scattered_moe(ScatteredExperts(
    router="router", input_linear="input_linear", output_linear="output_linear",
    activation="activation", bias="bias"))
COMPOSITES[f"{_J}Attention"] = mixture_of_attention(MixtureOfAttention(
    experts=ScatteredExperts(router="experts.router", input_linear="experts.input_linear",
                             output_linear="experts.output_linear", activation=None,
                             bias="bias", owner="experts"),
    kv_proj="kv_proj"))
COMPOSITES[f"{_J}DecoderLayer"] = pre_norm_layer(
    "input_layernorm", "self_attention", "post_attention_layernorm", "mlp")
# Gemma: sandwich norms; Gemma 3 also normalises q/k per head, on [b, h, s, d]
for _mod, _cls in (("gemma2", "Gemma2"), ("gemma3", "Gemma3")):
    COMPOSITES[f"{M}.{_mod}.modeling_{_mod}.{_cls}DecoderLayer"] = pre_norm_layer(
        "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
        "post_feedforward_layernorm")
COMPOSITES[f"{M}.gemma3.modeling_gemma3.Gemma3Attention"] = rope_attention(
    Out("q_norm"), Out("k_norm"))
COMPOSITES[f"{M}.gemma2.modeling_gemma2.Gemma2ForCausalLM"] = Functional(
    Unary(Ret("logits"), Out("lm_head")), name="final_softcap")
# Phi-3: fused qkv and gate/up projections, dropouts closing each branch
COMPOSITES[f"{M}.phi3.modeling_phi3.Phi3Attention"] = rope_attention(
    _heads("qkv_proj", 0), _heads("qkv_proj", 1, after=(In(ATTN, 0),)))
COMPOSITES[f"{M}.phi3.modeling_phi3.Phi3MLP"] = Functional(
    Mul(In("down_proj"), (Chunk(Out("gate_up_proj"), 2, 1), Out("activation_fn"))),
    name="gated_mlp")
COMPOSITES[f"{M}.phi3.modeling_phi3.Phi3DecoderLayer"] = pre_norm_layer(
    "input_layernorm", "resid_attn_dropout", "post_attention_layernorm", "resid_mlp_dropout")

# decoder heads that pick the last non-pad token's logits
POOL_LAST = Functional(Gather(Ret("logits"), Out("score"), dim=1), name="last_token_logits")
COMPOSITES["transformers.modeling_layers.GenericForSequenceClassification"] = POOL_LAST
COMPOSITES[f"{M}.gpt2.modeling_gpt2.GPT2ForSequenceClassification"] = POOL_LAST

# GPT-2: token + position embeddings, pre-LN blocks
COMPOSITES[f"{M}.gpt2.modeling_gpt2.GPT2Model"] = Functional(
    Add(In("drop"), (First((Out("wte"), Arg("inputs_embeds"))), Out("wpe"),
                     Opt(Out("wte", call=1))),
        absorb=(1, 2), names=("token", "position", "token_type")),
    name="embedding_sum")
COMPOSITES[f"{M}.gpt2.modeling_gpt2.GPT2Block"] = pre_norm_layer("ln_1", "attn", "ln_2", "mlp")

# BERT family: embedding sums, post-LN residuals inside the output modules
BERT_EMBEDDINGS = Functional(
    Add(In("LayerNorm"), (Tmp("tokens+types"), Out("position_embeddings")),
        absorb=(1,), names=("token", "position")),
    Add(Tmp("tokens+types"), (First((Out("word_embeddings"), Arg("inputs_embeds"))),
                              Out("token_type_embeddings")),
        absorb=(1,), names=("token", "token_type")),
    name="embedding_sum")
ADD_NORM = Functional(Add(In("LayerNorm"), (Out("dropout"), Arg(1)), names=("branch", "residual")),
                      name="add_norm")
for _mod, _cls in (("bert", "Bert"), ("roberta", "Roberta"), ("electra", "Electra")):
    _base = f"{M}.{_mod}.modeling_{_mod}.{_cls}"
    COMPOSITES[f"{_base}Embeddings"] = BERT_EMBEDDINGS
    COMPOSITES[f"{_base}SelfOutput"] = ADD_NORM
    COMPOSITES[f"{_base}Output"] = ADD_NORM
COMPOSITES[f"{M}.albert.modeling_albert.AlbertEmbeddings"] = BERT_EMBEDDINGS
COMPOSITES[f"{M}.roberta.modeling_roberta.RobertaClassificationHead"] = Functional(
    Unary(In("dropout", call=1), Out("dense")), name="tanh")
COMPOSITES[f"{M}.roberta.modeling_roberta.RobertaLMHead"] = Functional(
    Unary(In("layer_norm"), Out("dense")), name="gelu")
COMPOSITES[f"{M}.albert.modeling_albert.AlbertAttention"] = Functional(
    Add(In("LayerNorm"), (Arg(0), Out("output_dropout")), names=("residual", "attention")),
    name="add_norm")
COMPOSITES[f"{M}.albert.modeling_albert.AlbertLayer"] = Functional(
    Add(In("full_layer_layer_norm"), (Out("ffn_output"), Out("attention")),
        names=("mlp", "residual")),
    name="add_norm")
_DB = f"{M}.distilbert.modeling_distilbert"
COMPOSITES[f"{_DB}.Embeddings"] = Functional(
    Add(In("LayerNorm"), (First((Out("word_embeddings"), Arg("input_embeds"))),
                          Out("position_embeddings")),
        absorb=(1,), names=("token", "position")),
    name="embedding_sum")
COMPOSITES[f"{_DB}.TransformerBlock"] = Functional(
    Add(In("output_layer_norm"), (Out("ffn"), Out("sa_layer_norm")), names=("mlp", "residual")),
    Add(In("sa_layer_norm"), (Out("attention"), Arg(0)), names=("attention", "residual")),
    name="add_norm")
COMPOSITES[f"{_DB}.DistilBertForSequenceClassification"] = Functional(
    Unary(In("dropout"), Out("pre_classifier")), name="relu")

for _name, _rule in COMPOSITES.items():
    register_rule(_name, _rule, name=_rule.__name__)
