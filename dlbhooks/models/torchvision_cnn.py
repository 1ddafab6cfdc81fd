"""Composite rules for torchvision CNN families (METHOD.md §3), registered by dotted class
name so that dlbhooks never imports torchvision.

The functional maths hooks cannot see is of five kinds, each one small composite object
parameterised by child names (data, not code per block):

* :class:`ResidualAdd` — ``body + shortcut`` (in place or not), optionally followed by
  recorded post-add modules (ResNet's second ReLU) and guarded by a flag
  (``use_res_connect``). ResNet BasicBlock/Bottleneck, MobileNetV2/V3 InvertedResidual,
  EfficientNet MBConv/FusedMBConv.
* :class:`GateProduct` — ``scale * input`` of two activations (Squeeze-and-Excitation):
  half to each factor; the scale branch continues through the children.
* :class:`CatInputs` — the inputs (a list) are concatenated and fed to one child
  (DenseNet ``_DenseLayer``).
* :class:`CatOutputs` — the output is the concatenation of the input and every child's
  output (DenseNet ``_DenseBlock``).
* :class:`PooledHead` — ``features -> [relu] -> adaptive_avg_pool(1) -> flatten ->
  classifier`` done functionally (DenseNet, MobileNetV2).

Every composite seeds a bag with its output relevance (a bag without an owner: see
``keep_inputs`` of :meth:`~dlbhooks.engine.Engine.seed_outputs`), handles the functional
step with the §3 helpers (``rules/composite.py``), walks its children's records and
collects the relevance of its inputs. What a functional add or pool loses (positions where
every term is 0) is returned as absorbed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UnsupportedModuleError
from ..records import Record
from ..relevance import Rel, rmap
from ..rules.composite import add_split, per_stream, require_child
from ..rules.contract import RuleContext, RuleResult
from ..rules.elementwise import passthrough_rule, product_rule
from ..rules.pooling import adaptive_avg_pool_relevance
from ..rules.registry import register_rule

# -- helpers shared by the composites -------------------------------------------------------


def _zero_lost(R: Rel) -> Rel:
    return rmap(lambda t: t.new_zeros(()), R)


def _walk_all(rec: Record, R_out: list[Rel | None], ctx: RuleContext) -> RuleResult:
    """What the engine does for a container without a rule: walk every child."""
    bag = ctx.seed_outputs(rec, R_out, keep_inputs=False)
    ctx.walk(rec.children, bag)
    return RuleResult(ctx.collect(rec, bag))


def _first_relevance(R_out: list[Rel | None]) -> Rel:
    R = R_out[0]
    if R is None:
        raise UnsupportedModuleError("composite rule called without relevance on its output")
    return R


# -- the composites -------------------------------------------------------------------------


@dataclass(frozen=True)
class ResidualAdd:
    """``y = post(body_out + shortcut)``; ``shortcut`` is a child's output or the block input.

    ``body``: child whose output is the first term (its pre-add value is read through
    ``output_value``, so give the rule ``snapshot=(body,)`` when the add is in place).
    ``shortcut``: child producing the second term; when it is ``None`` or was not called
    (``downsample is None``), the block's first input is the term. Children called after
    both terms exist (ResNet's second ``relu``) are the post-add part. ``when``: name of a
    boolean attribute of the module; if false the forward has no add and the children are
    simply walked.
    """

    body: str
    shortcut: str | None = None
    when: str | None = None

    def __call__(self, rec: Record, R_out: list[Rel | None], ctx: RuleContext) -> RuleResult:
        if self.when is not None and not getattr(rec.module, self.when):
            return _walk_all(rec, R_out, ctx)
        body = require_child(rec, self.body, lift=True)
        short = rec.child(self.shortcut, lift=True) if self.shortcut else None
        kids = rec.children
        cut = max(kids.index(body), kids.index(short) if short is not None else -1) + 1
        pre, post = kids[:cut], kids[cut:]

        bag = ctx.seed_outputs(rec, R_out, keep_inputs=False)
        ctx.walk(post, bag)
        add_out = post[0].inputs[0] if post else rec.outputs[0]
        R = bag.pop(add_out)
        if R is None:  # nothing reached the sum: only the pre-add part may still hold some
            ctx.walk(pre, bag)
            return RuleResult(ctx.collect(rec, bag))

        a = body.output_value(0)
        if short is not None:
            b_tensor, b = short.outputs[0], short.output_value(0)
        else:
            b_tensor, b = rec.inputs[0], rec.input_value(0)
        (R_a, R_b), lost = add_split(R, [a, b])
        bag.add(body.outputs[0], R_a, body)
        bag.add(b_tensor, R_b, short)
        ctx.walk(pre, bag)
        return RuleResult(ctx.collect(rec, bag), lost)


@dataclass(frozen=True)
class GateProduct:
    """``y = gate * x`` with ``gate`` the output of child ``gate`` and ``x`` the block input
    (Squeeze-and-Excitation): half of the relevance to each factor (METHOD §3, product of
    two activations); the gate's half goes back through the children to ``x``."""

    gate: str

    def __call__(self, rec: Record, R_out: list[Rel | None], ctx: RuleContext) -> RuleResult:
        R = _first_relevance(R_out)
        g = require_child(rec, self.gate, lift=True)
        gate_t, x = g.outputs[0], rec.inputs[0]
        R_g, R_x = per_stream(lambda r: product_rule(r, [gate_t, x]), R)
        bag = ctx.new_bag()
        bag.add(gate_t, R_g, g)
        bag.add(x, R_x, None)
        ctx.walk(rec.children, bag)
        return RuleResult(ctx.collect(rec, bag), _zero_lost(R))


def _split_cat(R: Rel, sizes: list[int], dim: int) -> list[Rel]:
    """Exact inverse of ``torch.cat`` along ``dim``: move relevance with the data."""
    return per_stream(lambda r: list(torch.split(r, sizes, dim)), R)


def _check_cat(rec: Record, pieces: list[Tensor], total: int, dim: int) -> list[int]:
    sizes = [t.shape[dim] for t in pieces]
    if sum(sizes) != total:
        raise UnsupportedModuleError(
            f"composite rule for {rec.describe()}: the concatenated pieces have {sum(sizes)} "
            f"entries along dim {dim}, the concatenation {total}; the forward differs from "
            "the one the rule was written for."
        )
    return sizes


@dataclass(frozen=True)
class CatInputs:
    """The module concatenates its tensor inputs along ``dim`` and feeds the result to child
    ``consumer`` (DenseNet ``_DenseLayer``: ``torch.cat(inputs, 1)`` before ``norm1``)."""

    consumer: str
    dim: int = 1

    def __call__(self, rec: Record, R_out: list[Rel | None], ctx: RuleContext) -> RuleResult:
        bag = ctx.seed_outputs(rec, R_out, keep_inputs=False)
        last = rec.children[-1] if rec.children else None
        if last is not None and rec.outputs[0] is not last.outputs[0]:
            # an eval-mode functional dropout after the last child returns its input; any
            # other functional tail is not supported
            if rec.module.training or rec.outputs[0].shape != last.outputs[0].shape:
                raise UnsupportedModuleError(
                    f"{rec.describe()}: the output is not the last child's output "
                    "(training-mode dropout?); explain the model in eval mode."
                )
            R = bag.pop(rec.outputs[0])
            if R is not None:
                bag.add(last.outputs[0], R, None)
        ctx.walk(rec.children, bag)
        cat = require_child(rec, self.consumer, lift=True).inputs[0]
        R_cat = bag.pop(cat)
        if R_cat is not None:
            sizes = _check_cat(rec, rec.inputs, cat.shape[self.dim], self.dim)
            for t, R in zip(rec.inputs, _split_cat(R_cat, sizes, self.dim)):
                bag.add(t, R, None)
        return RuleResult(ctx.collect(rec, bag))


@dataclass(frozen=True)
class CatOutputs:
    """The output is ``torch.cat([input, *child outputs], dim)`` (DenseNet ``_DenseBlock``)."""

    dim: int = 1

    def __call__(self, rec: Record, R_out: list[Rel | None], ctx: RuleContext) -> RuleResult:
        R = _first_relevance(R_out)
        pieces = [rec.inputs[0]] + [c.outputs[0] for c in rec.children]
        sizes = _check_cat(rec, pieces, rec.outputs[0].shape[self.dim], self.dim)
        bag = ctx.new_bag()
        for t, c, R_t in zip(pieces, [None, *rec.children], _split_cat(R, sizes, self.dim)):
            bag.add(t, R_t, c)
        ctx.walk(rec.children, bag)
        return RuleResult(ctx.collect(rec, bag))


@dataclass(frozen=True)
class PooledHead:
    """``classifier(flatten(adaptive_avg_pool(relu?(features(x)), 1)))`` with the middle
    done functionally. ``relu``: an in-place ``F.relu`` on the features output (DenseNet;
    give the rule ``snapshot=(features,)``). The pool splits by the add rule over the
    window (``rules/pooling.py``); ReLU and flatten move relevance with the data."""

    features: str = "features"
    classifier: str = "classifier"
    relu: bool = False

    def __call__(self, rec: Record, R_out: list[Rel | None], ctx: RuleContext) -> RuleResult:
        feats = require_child(rec, self.features, lift=True)
        clf = require_child(rec, self.classifier, lift=True)
        kids = rec.children
        post = kids[kids.index(feats) + 1:]
        bag = ctx.seed_outputs(rec, R_out, keep_inputs=False)
        ctx.walk(post, bag)
        flat = clf.inputs[0]
        R_flat = bag.pop(flat)
        lost = None
        if R_flat is not None:
            x = feats.output_value(0)
            if self.relu:
                x = x.clamp_min(0)
            pooled = (*x.shape[:2], *([1] * (x.dim() - 2)))
            if flat.numel() != x.shape[0] * x.shape[1]:
                raise UnsupportedModuleError(
                    f"composite rule for {rec.describe()}: the classifier input has shape "
                    f"{tuple(flat.shape)}, not the pooled features {pooled}."
                )
            R_p = rmap(lambda r: r.reshape(pooled), R_flat)
            R_x, lost = per_stream(lambda r: adaptive_avg_pool_relevance(r, x), R_p)
            bag.add(feats.outputs[0], R_x, feats)
        ctx.walk(kids[: kids.index(feats) + 1], bag)
        return RuleResult(ctx.collect(rec, bag), lost)


# -- registrations --------------------------------------------------------------------------

_TV = "torchvision.models."

#: class name -> (composite, snapshot children). Adding a family is one entry here.
COMPOSITES: dict[str, tuple[Callable[..., RuleResult], tuple[str, ...]]] = {
    _TV + "resnet.BasicBlock": (ResidualAdd("bn2", "downsample"), ("bn2",)),
    _TV + "resnet.Bottleneck": (ResidualAdd("bn3", "downsample"), ("bn3",)),
    _TV + "mobilenetv2.InvertedResidual": (ResidualAdd("conv", when="use_res_connect"), ()),
    _TV + "mobilenetv3.InvertedResidual": (
        ResidualAdd("block", when="use_res_connect"), ("block",)),
    _TV + "efficientnet.MBConv": (
        ResidualAdd("stochastic_depth", when="use_res_connect"), ("stochastic_depth",)),
    _TV + "efficientnet.FusedMBConv": (
        ResidualAdd("stochastic_depth", when="use_res_connect"), ("stochastic_depth",)),
    "torchvision.ops.misc.SqueezeExcitation": (GateProduct("scale_activation"), ()),
    _TV + "densenet._DenseLayer": (CatInputs("norm1"), ()),
    _TV + "densenet._DenseBlock": (CatOutputs(), ()),
    _TV + "densenet.DenseNet": (PooledHead(relu=True), ("features",)),
    _TV + "mobilenetv2.MobileNetV2": (PooledHead(), ()),
}

for _name, (_rule, _snap) in COMPOSITES.items():
    register_rule(_name, _rule, snapshot=_snap,
                  name=f"{type(_rule).__name__}:{_name.rsplit('.', 1)[1]}")

# StochasticDepth is the identity in eval (and a per-row constant scale in training): all
# relevance to its input.
register_rule("torchvision.ops.stochastic_depth.StochasticDepth", passthrough_rule,
              name="passthrough")
