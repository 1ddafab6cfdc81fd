"""Remove experts from routing (reversibly): their router logits are masked to -inf, so
top-k picks among the remaining experts; and write a smaller checkpoint without them.

    with pruned(model, {"model.layers.0.mlp": [3, 5]}):      # masked routing, reversible
        ...
    write_pruned_checkpoint(model, plan, "out/")               # the experts physically gone

Both give the same model: the masked experts get probability 0 in the softmax over the
router logits, which is the softmax over the remaining experts' logits.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

#: router classes whose forward is ``logits -> softmax -> top-k (-> renormalise)``
SOFTMAX_TOPK_ROUTERS = {
    "Qwen3MoeTopKRouter", "OlmoeTopKRouter", "MixtralTopKRouter", "Qwen2MoeTopKRouter",
}
#: router classes whose forward is ``logits -> top-k -> softmax over the k`` (GPT-OSS)
TOPK_SOFTMAX_ROUTERS = {"GptOssTopKRouter"}


@dataclass(frozen=True)
class ExpertParams:
    """Which tensors of an MoE block are indexed by expert (first dimension)."""

    router: tuple[str, ...] = ("weight", "bias")  # [E, H] logits weight, [E] bias
    experts: tuple[str, ...] = ("gate_up_proj", "down_proj", "gate_up_proj_bias",
                                "down_proj_bias")  # fused 3-D weights [E, ...], biases [E, .]


FUSED_EXPERTS = ExpertParams()
#: integer attributes (modules and config) that hold the number of experts
COUNT_ATTRS = ("num_experts", "num_local_experts")


def _router_of(model: nn.Module, block: str) -> nn.Module:
    mod = model.get_submodule(block)
    router = _find_router(mod)
    if router is None:
        supported = sorted(SOFTMAX_TOPK_ROUTERS | TOPK_SOFTMAX_ROUTERS)
        raise ValueError(f"{block}: no supported router (supported: {supported})")
    return router


def _find_router(mod: nn.Module) -> nn.Module | None:
    for name in ("gate", "router"):
        r = getattr(mod, name, None)
        if r is not None and type(r).__name__ in SOFTMAX_TOPK_ROUTERS | TOPK_SOFTMAX_ROUTERS:
            return r
    return None


def _reroute(mod: nn.Module, logits: torch.Tensor, mask: torch.Tensor):
    """The router's (logits, weights, indices) with the masked experts never selected."""
    masked = logits.masked_fill(mask.to(logits.device), float("-inf"))
    if type(mod).__name__ in TOPK_SOFTMAX_ROUTERS:
        top, idx = torch.topk(masked, mod.top_k, dim=-1)
        return logits, torch.softmax(top, dim=1, dtype=top.dtype), idx
    probs = torch.softmax(masked, dtype=torch.float, dim=-1)
    top, idx = torch.topk(probs, mod.top_k, dim=-1)
    if getattr(mod, "norm_topk_prob", type(mod).__name__ == "MixtralTopKRouter"):
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top.to(logits.dtype), idx


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
        _check_ids(block, drop, router.num_experts)
        mask = torch.zeros(router.num_experts, dtype=torch.bool)
        mask[list(drop)] = True
        if int(mask.sum()) > router.num_experts - router.top_k:
            raise ValueError(f"{block}: pruning {len(drop)} of {router.num_experts} experts "
                             f"leaves fewer than top_k={router.top_k}")

        def hook(mod, args, output, mask=mask):
            return _reroute(mod, output[0], mask)

        hook.dlbhooks_pruning = True
        handles.append(router.register_forward_hook(hook))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def _check_ids(block: str, drop, E: int) -> None:
    bad = sorted(int(e) for e in drop if not 0 <= int(e) < E)
    if bad:
        raise ValueError(f"{block}: expert ids {bad} out of range 0..{E - 1} (shared experts, "
                         "reported as extra columns after the routed ones, cannot be pruned)")


def moe_blocks(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Every MoE block with a supported router: path -> (router, experts module)."""
    out = {}
    for path, mod in model.named_modules():
        router, experts = _find_router(mod), getattr(mod, "experts", None)
        if router is not None and isinstance(experts, nn.Module):
            out[path] = (router, experts)
    return out


def _slice(module: nn.Module, names: tuple[str, ...], keep: torch.Tensor, E: int) -> int:
    """Keep rows ``keep`` (first dim) of the named parameters; returns parameters removed."""
    removed = 0
    for name in names:
        p = getattr(module, name, None)
        if p is None:
            continue
        if p.shape[0] != E:
            raise ValueError(f"{type(module).__name__}.{name} has shape {tuple(p.shape)}, "
                             f"expected {E} experts first")
        new = nn.Parameter(p.detach()[keep.to(p.device)].clone(), requires_grad=p.requires_grad)
        removed += p.numel() - new.numel()
        setattr(module, name, new)
    return removed


def _set_count(obj, n: int) -> None:
    for attr in COUNT_ATTRS:
        if isinstance(getattr(obj, attr, None), int) and not isinstance(getattr(obj, attr), bool):
            setattr(obj, attr, n)


def drop_experts(model: nn.Module, experts: dict[str, list[int]],
                 params: ExpertParams = FUSED_EXPERTS) -> dict[str, list[int]]:
    """Physically remove experts, in place: the router's rows (weight, bias) and the fused
    expert tensors of each MoE block (path -> expert ids to drop), and the expert count of
    the modules and the config. Every MoE block must keep the same number of experts (the
    config holds one count). Returns, per block, the old ids of the kept experts (new id
    ``i`` is old id ``kept[i]``)."""
    blocks = moe_blocks(model)
    unknown = sorted(set(experts) - set(blocks))
    if unknown:
        raise ValueError(f"not MoE blocks with a supported router: {unknown} "
                         f"(MoE blocks: {sorted(blocks)[:8]}{' ...' if len(blocks) > 8 else ''})")
    if not blocks:
        raise ValueError("the model has no MoE block with a supported router")
    plan = {}
    for path, (router, _) in blocks.items():
        if any(getattr(h, "dlbhooks_pruning", False) for h in router._forward_hooks.values()):
            raise ValueError(f"{path}: routing is masked by pruned(...); drop experts outside "
                             "that block")
        E = router.num_experts
        drop = sorted(set(int(e) for e in experts.get(path, [])))
        _check_ids(path, drop, E)
        plan[path] = [e for e in range(E) if e not in drop]
    counts = {path: len(kept) for path, kept in plan.items()}
    if len(set(counts.values())) != 1:
        raise ValueError("every MoE block must keep the same number of experts (the config "
                         f"has one count); the plan keeps {counts}")
    n = next(iter(counts.values()))
    top_k = {router.top_k for router, _ in blocks.values()}
    if n < max(top_k):
        raise ValueError(f"keeping {n} experts per block leaves fewer than top_k={max(top_k)}")
    for path, (router, experts_mod) in blocks.items():
        E = router.num_experts
        if len(plan[path]) == E:
            continue
        keep = torch.tensor(plan[path], dtype=torch.long)
        _slice(router, params.router, keep, E)
        _slice(experts_mod, params.experts, keep, E)
        for mod in (router, experts_mod, model.get_submodule(path)):
            _set_count(mod, n)
    configs = {id(m.config): m.config for m in model.modules()
               if getattr(m, "config", None) is not None}
    for cfg in configs.values():
        _set_count(cfg, n)
    return plan


def write_pruned_checkpoint(model: nn.Module, experts: dict[str, list[int]],
                            out_dir: str | Path, *, in_place: bool = False,
                            params: ExpertParams = FUSED_EXPERTS) -> nn.Module:
    """Save a smaller checkpoint without the listed experts (``save_pretrained``,
    safetensors) to ``out_dir``, with ``pruned_experts.json`` mapping new expert ids to the
    old ones. Works on a deep copy unless ``in_place``; returns the smaller model, which
    computes what ``pruned(model, experts)`` computes."""
    target = model if in_place else copy.deepcopy(model)
    kept = drop_experts(target, experts, params)
    out = Path(out_dir)
    target.save_pretrained(out, safe_serialization=True)
    info = {"kept": kept, "dropped": {k: sorted(int(e) for e in v) for k, v in experts.items()}}
    (out / "pruned_experts.json").write_text(json.dumps(info, indent=1) + "\n")
    return target
