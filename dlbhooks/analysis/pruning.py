"""Remove experts from routing (reversibly): their router logits are masked to -inf, so
top-k picks among the remaining experts; and write a smaller checkpoint without them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

#: router classes whose forward is ``logits -> softmax -> top-k (-> renormalise)``
SOFTMAX_TOPK_ROUTERS = {
    "Qwen3MoeTopKRouter", "OlmoeTopKRouter", "MixtralTopKRouter", "Qwen2MoeTopKRouter",
}


def _router_of(model: nn.Module, block: str) -> nn.Module:
    mod = model.get_submodule(block)
    for name in ("gate", "router"):
        r = getattr(mod, name, None)
        if r is not None and type(r).__name__ in SOFTMAX_TOPK_ROUTERS:
            return r
    raise ValueError(f"{block}: no supported router (supported: {sorted(SOFTMAX_TOPK_ROUTERS)})")


@contextlib.contextmanager
def pruned(model: nn.Module, experts: dict[str, list[int]]) -> Iterator[nn.Module]:
    """Inside the block, the listed experts of each MoE block (path -> expert ids) are never
    selected. A forward hook re-derives the router's outputs from its logits with those
    experts masked; removed on exit."""
    handles = []
    for block, drop in experts.items():
        if not drop:
            continue
        router = _router_of(model, block)
        mask = torch.zeros(router.num_experts, dtype=torch.bool)
        mask[list(drop)] = True
        if int(mask.sum()) > router.num_experts - router.top_k:
            raise ValueError(f"{block}: pruning {len(drop)} of {router.num_experts} experts "
                             f"leaves fewer than top_k={router.top_k}")

        def hook(mod, args, output, mask=mask):
            logits = output[0]
            masked = logits.masked_fill(mask.to(logits.device), float("-inf"))
            probs = torch.softmax(masked, dtype=torch.float, dim=-1)
            top, idx = torch.topk(probs, mod.top_k, dim=-1)
            if getattr(mod, "norm_topk_prob", type(mod).__name__ == "MixtralTopKRouter"):
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), idx

        handles.append(router.register_forward_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
