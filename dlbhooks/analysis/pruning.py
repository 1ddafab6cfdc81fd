"""Remove experts from routing (reversibly): their router logits are masked to -inf, so
top-k picks among the remaining experts; and write a smaller checkpoint without them.

    with pruned(model, {"model.layers.0.mlp": [3, 5]}):      # masked routing, reversible
        ...
    write_pruned_checkpoint(model, plan, "out/")               # the experts physically gone

Both give the same model: the masked experts get probability 0 in the softmax over the
router logits, which is the softmax over the remaining experts' logits. Supported routers
(and where each family keeps its expert tensors) are listed in :data:`ROUTERS`. For a
checkpoint too large to load: :func:`dlbhooks.analysis.checkpoint.prune_checkpoint`.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn


@dataclass(frozen=True)
class ExpertParams:
    """Which tensors of an MoE block are indexed by expert (first dimension): names (dotted
    paths allowed) on the router, and on each expert module."""

    router: tuple[str, ...] = ("weight", "bias")  # [E, H] logits weight, [E] bias
    experts: tuple[str, ...] = ("gate_up_proj", "down_proj", "gate_up_proj_bias",
                                "down_proj_bias")  # fused 3-D weights [E, ...], biases [E, .]


FUSED_EXPERTS = ExpertParams()
#: integer attributes (modules and config) that hold the number of experts
COUNT_ATTRS = ("num_experts", "num_local_experts")
#: attributes of an MoE block that may hold its router
ROUTER_ATTRS = ("gate", "router")


@dataclass(frozen=True)
class RouterKind:
    """How a router class is masked, and where its block keeps the expert-indexed tensors.

    ``mask``: ``"softmax_topk"`` (forward ``logits -> softmax -> top-k (-> renormalise)``,
    outputs re-derived from the masked logits), ``"topk_softmax"`` (``logits -> top-k ->
    softmax over the k``, likewise) or ``"logits"`` (the output of the router's submodule
    ``logits`` is the logits: masked entries set to -inf, the router's own forward does the
    rest). ``experts``: module paths, relative to the block, holding ``params.experts``."""

    mask: str
    logits: str = ""
    experts: tuple[str, ...] = ("experts",)
    params: ExpertParams = FUSED_EXPERTS
    norm_topk: bool = False  # renormalise the top-k weights when the router has no
    # ``norm_topk_prob`` attribute


#: supported router classes (by class name)
ROUTERS: dict[str, RouterKind] = {
    "Qwen3MoeTopKRouter": RouterKind("softmax_topk"),
    "OlmoeTopKRouter": RouterKind("softmax_topk"),
    "MixtralTopKRouter": RouterKind("softmax_topk", norm_topk=True),
    "Qwen2MoeTopKRouter": RouterKind("softmax_topk"),
    "GptOssTopKRouter": RouterKind("topk_softmax"),
    # JetMoE (MLP blocks and mixture-of-attention blocks): experts directly on the block,
    # JetMoeParallelExperts weights [E, out, in]; logits from the router's nn.Linear
    "JetMoeTopKGating": RouterKind(
        "logits", logits="layer", experts=("input_linear", "output_linear"),
        params=ExpertParams(router=("layer.weight", "layer.bias"), experts=("weight",))),
}
#: router classes whose forward is ``logits -> softmax -> top-k (-> renormalise)``
SOFTMAX_TOPK_ROUTERS = {n for n, k in ROUTERS.items() if k.mask == "softmax_topk"}
#: router classes whose forward is ``logits -> top-k -> softmax over the k`` (GPT-OSS)
TOPK_SOFTMAX_ROUTERS = {n for n, k in ROUTERS.items() if k.mask == "topk_softmax"}


def router_kind(router: nn.Module) -> RouterKind:
    """The :data:`ROUTERS` entry of a supported router module."""
    return ROUTERS[type(router).__name__]


def _size(router: nn.Module) -> tuple[int, int]:
    """``(num_experts, top_k)`` of a supported router."""
    return cast(int, router.num_experts), cast(int, router.top_k)


def _router_of(model: nn.Module, block: str) -> nn.Module:
    router = _find_router(model.get_submodule(block))
    if router is None:
        raise ValueError(f"{block}: no supported router (supported: {sorted(ROUTERS)})")
    return router


def _router_attr(mod: nn.Module) -> str | None:
    """The attribute of ``mod`` holding a supported router whose expert modules exist."""
    for name in ROUTER_ATTRS:
        r = getattr(mod, name, None)
        kind = ROUTERS.get(type(r).__name__) if isinstance(r, nn.Module) else None
        if kind is not None and all(isinstance(getattr(mod, e, None), nn.Module)
                                    for e in kind.experts):
            return name
    return None


def _find_router(mod: nn.Module) -> nn.Module | None:
    name = _router_attr(mod)
    return None if name is None else getattr(mod, name)


def _hooked(router: nn.Module) -> nn.Module:
    """The module whose forward hook masks the routing (the router, or its logits module)."""
    kind = router_kind(router)
    return router.get_submodule(kind.logits) if kind.mask == "logits" else router


def _reroute(mod: nn.Module, logits: torch.Tensor, mask: torch.Tensor):
    """The router's (logits, weights, indices) with the masked experts never selected."""
    kind, (_, k) = router_kind(mod), _size(mod)
    masked = logits.masked_fill(mask.to(logits.device), float("-inf"))
    if kind.mask == "topk_softmax":
        top, idx = torch.topk(masked, k, dim=-1)
        return logits, torch.softmax(top, dim=1, dtype=top.dtype), idx
    probs = torch.softmax(masked, dtype=torch.float, dim=-1)
    top, idx = torch.topk(probs, k, dim=-1)
    if getattr(mod, "norm_topk_prob", kind.norm_topk):
        top = top / top.sum(dim=-1, keepdim=True)
    return logits, top.to(logits.dtype), idx


def _mask_hook(router: nn.Module, mask: torch.Tensor):
    if router_kind(router).mask == "logits":
        def hook(mod, args, output):
            return output.masked_fill(mask.to(output.device), float("-inf"))
    else:
        def hook(mod, args, output):
            return _reroute(mod, output[0], mask)
    hook.dlbhooks_pruning = True  # type: ignore[attr-defined]
    return hook


@contextlib.contextmanager
def pruned(model: nn.Module, experts: dict[str, list[int]]) -> Iterator[nn.Module]:
    """Inside the block, the listed experts of each MoE block (path -> expert ids) are never
    selected. A forward hook masks their router logits (and re-derives the router's outputs
    where the router computes them itself); removed on exit."""
    handles = []
    try:
        for block, drop in experts.items():
            if not drop:
                continue
            router = _router_of(model, block)
            E, k = _size(router)
            _check_ids(block, drop, E)
            mask = torch.zeros(E, dtype=torch.bool)
            mask[list(drop)] = True
            if int(mask.sum()) > E - k:
                raise ValueError(f"{block}: pruning {len(drop)} of {E} experts leaves fewer "
                                 f"than top_k={k}")
            handles.append(_hooked(router).register_forward_hook(_mask_hook(router, mask)))
        yield model
    finally:
        for h in handles:
            h.remove()


def _check_ids(block: str, drop, E: int) -> None:
    bad = sorted(int(e) for e in drop if not 0 <= int(e) < E)
    if bad:
        raise ValueError(f"{block}: expert ids {bad} out of range 0..{E - 1} (shared experts, "
                         "reported as extra columns after the routed ones, cannot be pruned)")


def validate_plan(blocks: Mapping[str, tuple[int, int]],
                  experts: Mapping[str, Iterable[int]]) -> dict[str, list[int]]:
    """Check a pruning plan (block path -> expert ids to drop) against the MoE blocks
    (path -> ``(num_experts, top_k)``); returns, per block, the old ids of the kept experts.
    Raises ValueError for: no MoE block, unknown blocks, ids out of range, a plan dropping
    nothing, unequal kept counts (the config holds one count), fewer kept than top_k."""
    if not blocks:
        raise ValueError("the model has no MoE block with a supported router "
                         f"(supported routers: {sorted(ROUTERS)})")
    unknown = sorted(set(experts) - set(blocks))
    if unknown:
        raise ValueError(f"not MoE blocks with a supported router: {unknown} "
                         f"(MoE blocks: {sorted(blocks)[:8]}{' ...' if len(blocks) > 8 else ''})")
    plan = {}
    for path, (E, _) in blocks.items():
        drop = sorted(set(int(e) for e in experts.get(path, [])))
        _check_ids(path, drop, E)
        plan[path] = [e for e in range(E) if e not in drop]
    if all(len(plan[p]) == E for p, (E, _) in blocks.items()):
        raise ValueError("the plan drops no expert")
    counts = {path: len(kept) for path, kept in plan.items()}
    if len(set(counts.values())) != 1:
        raise ValueError("every MoE block must keep the same number of experts (the config "
                         f"has one count); the plan keeps {counts}")
    n = next(iter(counts.values()))
    top_k = max(k for _, k in blocks.values())
    if n < top_k:
        short = [p for p, (_, k) in blocks.items() if k > n]
        raise ValueError(f"keeping {n} experts per block leaves fewer than top_k={top_k} "
                         f"({short[0]}{' ...' if len(short) > 1 else ''})")
    return plan


def moe_blocks(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    """Every MoE block with a supported router: path -> (router, experts module). Where the
    experts live directly on the block (JetMoE), the experts module is the block itself."""
    out = {}
    for path, mod in model.named_modules():
        router = _find_router(mod)
        if router is not None:
            experts = router_kind(router).experts
            out[path] = (router, getattr(mod, experts[0]) if len(experts) == 1 else mod)
    return out


def _slice(module: nn.Module, names: tuple[str, ...], keep: torch.Tensor, E: int) -> int:
    """Keep rows ``keep`` (first dim) of the named parameters (dotted paths allowed);
    returns the number of parameters removed."""
    removed = 0
    for name in names:
        owner_path, _, attr = name.rpartition(".")
        try:
            owner = module.get_submodule(owner_path)
        except AttributeError:
            continue
        p = getattr(owner, attr, None)
        if p is None:
            continue
        if p.shape[0] != E:
            raise ValueError(f"{type(module).__name__}.{name} has shape {tuple(p.shape)}, "
                             f"expected {E} experts first")
        new = nn.Parameter(p.detach()[keep.to(p.device)].clone(), requires_grad=p.requires_grad)
        removed += p.numel() - new.numel()
        setattr(owner, attr, new)
        if isinstance(owner, nn.Linear) and attr == "weight":
            owner.out_features = new.shape[0]
    return removed


def _set_count(obj, n: int) -> None:
    for attr in COUNT_ATTRS:
        if isinstance(getattr(obj, attr, None), int) and not isinstance(getattr(obj, attr), bool):
            setattr(obj, attr, n)


def drop_experts(model: nn.Module, experts: dict[str, list[int]],
                 params: ExpertParams | None = None) -> dict[str, list[int]]:
    """Physically remove experts, in place: the router's rows (weight, bias) and the expert
    tensors of each MoE block (path -> expert ids to drop), and the expert count of the
    modules and the config. Every MoE block must keep the same number of experts (the
    config holds one count). ``params``: which tensors are expert-indexed (default: the
    router's :data:`ROUTERS` entry). Returns, per block, the old ids of the kept experts
    (new id ``i`` is old id ``kept[i]``)."""
    blocks = {path: model.get_submodule(path) for path in moe_blocks(model)}
    routers = {path: router for path, (router, _) in moe_blocks(model).items()}
    plan = validate_plan({p: _size(r) for p, r in routers.items()}, experts)
    for path, router in routers.items():
        if any(getattr(h, "dlbhooks_pruning", False)
               for h in _hooked(router)._forward_hooks.values()):
            raise ValueError(f"{path}: routing is masked by pruned(...); drop experts outside "
                             "that block")
    n = len(next(iter(plan.values())))
    for path, router in routers.items():
        E = _size(router)[0]
        if len(plan[path]) == E:
            continue
        kind = router_kind(router)
        names = params or kind.params
        keep = torch.tensor(plan[path], dtype=torch.long)
        if not _slice(router, names.router, keep, E):
            raise ValueError(f"{path}: none of the router tensors {names.router} found")
        expert_mods = [blocks[path].get_submodule(e) for e in kind.experts]
        for mod in expert_mods:
            _slice(mod, names.experts, keep, E)
        for mod in (router, *expert_mods, blocks[path]):
            _set_count(mod, n)
    configs = {id(m.config): m.config for m in model.modules()
               if getattr(m, "config", None) is not None}
    for cfg in configs.values():
        _set_count(cfg, n)
    return plan


def write_pruned_checkpoint(model: nn.Module, experts: dict[str, list[int]],
                            out_dir: str | Path, *, in_place: bool = False,
                            params: ExpertParams | None = None) -> nn.Module:
    """Save a smaller checkpoint without the listed experts (``save_pretrained``,
    safetensors) to ``out_dir``, with ``pruned_experts.json`` mapping new expert ids to the
    old ones. Works on a deep copy unless ``in_place``; returns the smaller model, which
    computes what ``pruned(model, experts)`` computes. (For a checkpoint larger than
    memory: :func:`dlbhooks.analysis.checkpoint.prune_checkpoint`.)"""
    target = model if in_place else copy.deepcopy(model)
    kept = drop_experts(target, experts, params)
    out = Path(out_dir)
    cast(Any, target).save_pretrained(out, safe_serialization=True)  # a transformers model
    (out / "pruned_experts.json").write_text(json.dumps(pruning_info(kept, experts), indent=1)
                                             + "\n")
    return target


def pruning_info(kept: dict[str, list[int]],
                 experts: Mapping[str, Iterable[int]]) -> dict[str, dict[str, list[int]]]:
    """The contents of ``pruned_experts.json``: per block, the old ids kept (new id ``i`` is
    old id ``kept[i]``) and the ids dropped."""
    return {"kept": kept, "dropped": {k: sorted(int(e) for e in v) for k, v in experts.items()}}
