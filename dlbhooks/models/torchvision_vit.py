"""Composite rules for torchvision Vision Transformers (``vit_b_16`` family).

Registered by dotted class name, so importing dlbhooks does not import torchvision. The
functional parts of the forwards are handled here; everything else (conv_proj, LayerNorms,
``nn.MultiheadAttention``, the MLP, the heads, and the views ``reshape``/``permute``/
``x[:, 0]``) goes through the recorded child calls:

- ``EncoderBlock``: ``x = dropout(attn(ln_1(input))) + input; return x + mlp(ln_2(x))`` —
  both residual adds use the add rule (METHOD.md §3).
- ``Encoder``: ``input + pos_embedding`` — the position embedding's add-rule share is
  absorbed (it is a parameter).
- ``VisionTransformer``: ``cat([class_token, patches])`` — the class token's share is
  absorbed, the patch tokens' relevance is moved back onto ``conv_proj``'s output.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import UnsupportedModuleError
from ..records import Record
from ..relevance import Rel, radd, rmap
from ..rules.composite import add_split, first_stream, require_child
from ..rules.contract import RuleContext, RuleResult
from ..rules.registry import register_rule

_VIT = "torchvision.models.vision_transformer"


def _total(R: Rel) -> Rel:
    return rmap(lambda t: t.sum(), R)


def _child(rec: Record, name: str) -> Record:
    return require_child(rec, name, expected="torchvision's")


@register_rule(f"{_VIT}.EncoderBlock", name="torchvision_vit_encoder_block")
def encoder_block_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """Pre-norm transformer block with two functional residual adds."""
    drop, ln_2, mlp = _child(rec, "dropout"), _child(rec, "ln_2"), _child(rec, "mlp")
    x_mid = ln_2.inputs[0]  # dropout(attention) + input
    (R_mid, R_mlp), lost = add_split(R_out[0], [ln_2.input_value(0), mlp.output_value(0)])
    bag = ctx.new_bag(rec)
    bag.add(x_mid, R_mid, None)
    bag.add(mlp.outputs[0], R_mlp, None)
    ctx.walk([c for c in rec.children if c.index >= ln_2.index], bag)
    R_mid = bag.pop(x_mid)
    (R_attn, R_res), lost_1 = add_split(R_mid, [drop.output_value(0), rec.input_value(0)])
    bag.add(drop.outputs[0], R_attn, None)
    bag.add(rec.inputs[0], R_res, None)
    ctx.walk([c for c in rec.children if c.index < ln_2.index], bag)
    return RuleResult(ctx.collect(rec, bag), radd(lost, lost_1))


@register_rule(f"{_VIT}.Encoder", name="torchvision_vit_encoder")
def encoder_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """``ln(layers(dropout(input + pos_embedding)))``: pos_embedding's share is absorbed."""
    summed = _child(rec, "dropout").inputs[0]
    bag = ctx.seed_outputs(rec, R_out)
    ctx.walk(rec.children, bag)
    R = bag.pop(summed)
    if R is None:
        return RuleResult(ctx.collect(rec, bag))
    pos = ctx.param(rec.module, "pos_embedding")
    (R_x, R_pos), lost = add_split(R, [rec.input_value(0), pos])
    bag.add(rec.inputs[0], R_x, None)
    return RuleResult(ctx.collect(rec, bag), radd(_total(R_pos), lost))


@register_rule(f"{_VIT}.VisionTransformer", name="torchvision_vit")
def vision_transformer_rule(rec: Record, R_out: list[Tensor | None],
                            ctx: RuleContext) -> RuleResult:
    """``heads(encoder(cat([class_token, patches(conv_proj(x))]))[:, 0])``: the class
    token's share is absorbed; patch relevance returns to conv_proj's output."""
    conv, enc = _child(rec, "conv_proj"), _child(rec, "encoder")
    bag = ctx.seed_outputs(rec, R_out)
    ctx.walk([c for c in rec.children if c.index >= enc.index], bag)
    R = bag.pop(enc.inputs[0])
    if R is None:
        return RuleResult(ctx.collect(rec, bag))
    token = ctx.param(rec.module, "class_token")
    n_prefix = token.shape[1] if token is not None else 0
    feat = conv.outputs[0]  # [n, hidden, n_h, n_w]
    n_patches = feat.shape[2] * feat.shape[3]
    n_tokens = first_stream(R).shape[1]
    if n_tokens != n_prefix + n_patches:
        raise UnsupportedModuleError(
            f"{rec.describe()}: the encoder input does not have class token + "
            f"{n_patches} patch tokens; register your own rule for this model."
        )
    absorbed = rmap(lambda r: r[:, :n_prefix].sum(), R)
    R_feat = rmap(lambda r: r[:, n_prefix:].permute(0, 2, 1).reshape(feat.shape), R)
    bag.add(feat, R_feat, None)
    ctx.walk([c for c in rec.children if c.index < enc.index], bag)
    return RuleResult(ctx.collect(rec, bag), absorbed)


__all__ = ["encoder_block_rule", "encoder_rule", "vision_transformer_rule"]
