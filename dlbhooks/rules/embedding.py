"""Embeddings (METHOD.md §3): a token's relevance is the sum of its vector's relevance."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .arith import safe_div
from .contract import RuleContext, RuleResult
from .functional import close_to_recorded
from .registry import register_rule

if TYPE_CHECKING:
    from ..records import Record


def _embedding_fits(rec: Record) -> bool:
    """Is the recorded call a lookup of its one (integer) tensor input, as
    ``nn.Embedding``, up to a constant factor (a scaled word embedding)? A learned position
    table that computes its positions from a mask is not."""
    out = rec.outputs[0] if rec.outputs else None
    if len(rec.inputs) != 1 or out is None or rec.inputs[0].is_floating_point():
        return False
    ids, W = rec.inputs[0], rec.module.weight
    if tuple(out.shape) != (*ids.shape, W.shape[-1]):
        return False
    if W.device.type == "meta":
        return True  # offloaded: the shape only
    emb = F.embedding(ids, W).to(out.dtype)
    scale = out.norm() / emb.norm() if float(emb.norm()) > 0 else out.new_ones(())
    return close_to_recorded(emb * scale, out)


@register_rule(nn.Embedding, name="embedding", check=_embedding_fits)
def embedding_rule(rec: Record, R_out: list[Tensor | None], ctx: RuleContext) -> RuleResult:
    """Relevance per index: ``R[..., d]`` summed over the embedding dimension."""
    R = R_out[0]
    assert R is not None
    return RuleResult([R.sum(-1)])


@register_rule(nn.EmbeddingBag, streamwise=True, name="embedding_bag")
def embedding_bag_rule(rec: Record, R_out: list[Tensor | None],
                       ctx: RuleContext) -> RuleResult:
    """A bag's relevance goes to its members: sum/mean by the add rule (∝ |e_d|, per
    dimension), max to each dimension's winner (ties split); then summed over dimensions.
    ``per_sample_weights`` are constants that scale the members' vectors."""
    m = rec.module
    args = rec.arguments
    idx = args.get("input")
    offsets = args.get("offsets")
    psw = args.get("per_sample_weights")
    R = R_out[0]
    W = ctx.param(m, "weight")
    assert R is not None and W is not None and isinstance(idx, Tensor)
    flat = idx.reshape(-1)
    if idx.dim() == 2:
        bag = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
    else:
        starts = offsets[:-1] if m.include_last_offset else offsets
        bag = torch.searchsorted(starts, torch.arange(flat.numel(), device=idx.device),
                                 right=True) - 1
    vec = W[flat].to(R.dtype)
    if psw is not None:
        vec = vec * psw.reshape(-1, 1).to(R.dtype)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if m.padding_idx is not None:
        keep = flat != m.padding_idx
    nb = R.shape[0]
    if m.mode == "max":
        best = torch.full((nb, vec.shape[1]), -torch.inf, dtype=vec.dtype, device=vec.device)
        masked = torch.where(keep[:, None], vec, torch.full_like(vec, -torch.inf))
        best = best.scatter_reduce(0, bag[:, None].expand_as(vec), masked, "amax")
        share = ((masked == best[bag]) & keep[:, None]).to(R.dtype)
    else:
        share = torch.where(keep[:, None], vec.abs(), torch.zeros_like(vec))
    den = torch.zeros_like(R).index_add_(0, bag, share)
    member = share * safe_div(R, den)[bag]
    R_idx = member.sum(-1).reshape(idx.shape)
    lost = R.sum() - member.sum()
    out: list[Tensor | None] = [None] * len(rec.inputs)
    for i, t in enumerate(rec.inputs):
        if t is idx:
            out[i] = R_idx
    return RuleResult(out, lost)
