"""Prune experts from a checkpoint directory on disk, tensor by tensor, without loading the
model: for models larger than memory.

    layout = moe_layout(AutoConfig.from_pretrained(src))   # the MoE blocks, no weights read
    prune_checkpoint(src, {"model.layers.0.mlp": [3], "model.layers.1.mlp": [5]}, "out/")

The result loads with ``from_pretrained`` and computes what ``pruned(model, plan)``
computes on the full model (:mod:`dlbhooks.analysis.pruning`). Block paths are module
paths of the in-memory model; on disk, keys may be named differently (e.g. Mixtral's
``block_sparse_moe``, per-expert tensors that transformers fuses when loading): the
checkpoint conversion mapping's renamings tell which block a disk key belongs to, and the
output keeps the disk names.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .pruning import COUNT_ATTRS, _router_attr, _size, pruning_info, router_kind, validate_plan

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
#: files of a source directory never copied: weights (the pruned shards replace those of
#: the checkpoint; others, e.g. ``consolidated.safetensors`` or ``*.bin``, would be unpruned)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                   ".gguf", ".index.json")
#: files written from scratch in the output directory
WRITTEN = ("config.json", "pruned_experts.json")


@dataclass(frozen=True)
class MoeBlock:
    """One MoE block: its module path, expert count, top-k, and (relative to the block) the
    module path of its router and of the modules holding expert-indexed tensors."""

    path: str
    num_experts: int
    top_k: int
    router: str
    experts: tuple[str, ...]


def moe_layout(config_or_model: Any, *, trust_remote_code: bool = False) -> dict[str, MoeBlock]:
    """Every MoE block with a supported router (path -> :class:`MoeBlock`), of a model or of
    a transformers config (its causal-LM model, else its base model, is built on the meta
    device: no weights are read or allocated)."""
    if isinstance(config_or_model, nn.Module):
        model = config_or_model
    else:
        model = _skeleton(config_or_model, trust_remote_code)
    out = {}
    for path, mod in model.named_modules():
        attr = _router_attr(mod)
        if attr is not None:
            router = mod.get_submodule(attr)
            out[path] = MoeBlock(path, *_size(router), attr, router_kind(router).experts)
    return out


def _skeleton(config: Any, trust_remote_code: bool) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    with init_empty_weights():
        try:
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except ValueError:  # no causal-LM class for this config
            return AutoModel.from_config(config, trust_remote_code=trust_remote_code)


# -- reading the checkpoint's headers ---------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    """A tensor of a source shard, from the shard's header."""

    key: str
    shape: tuple[int, ...]
    nbytes: int


def _header(path: Path) -> tuple[list[_Tensor], dict[str, str] | None]:
    """The tensors (in file order) and metadata of a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    meta = header.pop("__metadata__", None)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return [_Tensor(k, tuple(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in items], meta


def _shards(src: Path) -> tuple[list[str], dict[str, Any] | None]:
    """The checkpoint's shard file names and its index (None for a single file)."""
    if (src / INDEX).is_file():
        index = json.loads((src / INDEX).read_text())
        names = list(dict.fromkeys(index["weight_map"].values()))
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise ValueError(f"{src / INDEX} lists shards that do not exist: {missing}")
        return names, index
    if (src / SINGLE).is_file():
        return [SINGLE], None
    raise ValueError(f"{src}: no {SINGLE} or {INDEX} (only safetensors checkpoints are "
                     "supported)")


# -- classifying keys -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Action:
    """What happens to one source tensor: written as ``out`` (None: dropped), keeping rows
    ``rows`` of its first dimension (None: all)."""

    key: str
    out: str | None
    rows: tuple[int, ...] | None = None


@dataclass
class _Found:
    """What the checkpoint holds of one block."""

    router: int = 0
    fused: int = 0
    experts: set[int] = field(default_factory=set)


class _Classifier:
    """Maps disk keys to actions, given the layout, the kept experts and the renamings."""

    def __init__(self, layout: Mapping[str, MoeBlock], kept: Mapping[str, list[int]],
                 renamings: list[Any]):
        self.layout, self.kept, self.renamings = layout, kept, renamings
        self.found = {path: _Found() for path in layout}

    def memory_path(self, key: str) -> str:
        for rename in self.renamings:
            key = rename.rename_source_key(key)[0]
        return key

    def block_of(self, path: str) -> tuple[MoeBlock | None, str]:
        parts = path.split(".")
        for i in range(len(parts) - 1, 0, -1):
            block = self.layout.get(".".join(parts[:i]))
            if block is not None:
                return block, ".".join(parts[i:])
        return None, path

    def __call__(self, t: _Tensor) -> _Action:
        path = self.memory_path(t.key)
        block, rest = self.block_of(path)
        if block is None:
            return _Action(t.key, t.key)
        found = self.found[block.path]
        if rest.startswith(block.router + "."):
            found.router += 1
            return self._rows(t, block)
        for module in block.experts:
            if not rest.startswith(module + "."):
                continue
            head, _, tail = rest[len(module) + 1:].partition(".")
            if not (head.isdigit() and tail):  # a fused tensor [E, ...]
                found.fused += 1
                return self._rows(t, block)
            found.experts.add(int(head))
            return self._expert(t, block, path, int(head), tail)
        return _Action(t.key, t.key)  # e.g. a shared expert, a block bias

    def _rows(self, t: _Tensor, block: MoeBlock) -> _Action:
        E, keep = block.num_experts, self.kept[block.path]
        if not t.shape or t.shape[0] != E:
            raise ValueError(f"{t.key} has shape {list(t.shape)}: expected {E} experts first "
                             f"(block {block.path})")
        return _Action(t.key, t.key, None if len(keep) == E else tuple(keep))

    def _expert(self, t: _Tensor, block: MoeBlock, path: str, j: int, tail: str) -> _Action:
        """A per-expert tensor ``<experts module>.<j>.<tail>``: dropped or renumbered."""
        if j >= block.num_experts:
            raise ValueError(f"{t.key}: expert {j} of {path} out of range 0.."
                             f"{block.num_experts - 1} (block {block.path})")
        keep = self.kept[block.path]
        if j not in keep:
            return _Action(t.key, None)
        suffix = f".{j}.{tail}"
        if not t.key.endswith(suffix):
            raise ValueError(f"{t.key}: cannot find the expert index of {path} in the key")
        return _Action(t.key, f"{t.key[:-len(suffix)]}.{keep.index(j)}.{tail}")

    def check(self) -> None:
        """Raise unless every block's router and experts were found."""
        for path, found in self.found.items():
            block = self.layout[path]
            if not found.router:
                raise ValueError(f"{path}: no tensor of its router ({block.router}) in the "
                                 "checkpoint: layout not understood")
            missing = sorted(set(range(block.num_experts)) - found.experts)
            if not found.fused and missing:
                raise ValueError(f"{path}: experts {missing[:8]} not found in the checkpoint "
                                 f"(expert modules {list(block.experts)}): layout not "
                                 "understood")


def _renamings(model_type: str | None) -> list[Any]:
    """The key renamings (disk -> in-memory) of the model type's conversion mapping."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    mapping = get_checkpoint_conversion_mapping(model_type) if model_type else None
    return [t for t in mapping or [] if isinstance(t, WeightRenaming)]


# -- config and output directory ------------------------------------------------------------


def _set_counts(obj: Any, old: set[int], n: int) -> int:
    """Set the expert counts (``COUNT_ATTRS`` equal to an old count) of a config dict and its
    nested sub-configs to ``n``; returns how many were set."""
    if isinstance(obj, list):
        return sum(_set_counts(o, old, n) for o in obj)
    if not isinstance(obj, dict):
        return 0
    done = 0
    for k, v in obj.items():
        if k in COUNT_ATTRS and isinstance(v, int) and not isinstance(v, bool) and v in old:
            obj[k] = n
            done += 1
        else:
            done += _set_counts(v, old, n)
    return done


def _check_out(src: Path, out: Path, force: bool) -> None:
    if out.resolve() == src.resolve():
        raise ValueError(f"out_dir is src_dir ({src}): refusing to overwrite the checkpoint")
    if out.resolve() in src.resolve().parents:
        raise ValueError(f"out_dir {out} contains src_dir {src}: refusing to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty (force=True replaces its "
                              "contents)")


def _clear(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _copy_others(src: Path, out: Path, shards: Iterable[str]) -> tuple[list[str], list[str]]:
    """Copy the top-level files of ``src`` other than weights and written files; returns
    (copied, skipped) names (skipped: other weight files and directories)."""
    copied, skipped = [], []
    for p in sorted(src.iterdir()):
        if p.name in WRITTEN or p.name in shards or p.name == INDEX:
            continue
        if p.is_dir() or p.name.endswith(WEIGHT_SUFFIXES):
            skipped.append(p.name)
            continue
        shutil.copy2(p, out / p.name)
        copied.append(p.name)
    return copied, skipped


# -- the pruning ----------------------------------------------------------------------------


def _plan_shards(src: Path, shards: list[str], classify: _Classifier):
    """Per shard: its tensors' actions and metadata, and the source tensors (headers only)."""
    plan, tensors = [], []
    for name in shards:
        found, meta = _header(src / name)
        plan.append((name, [classify(t) for t in found], meta))
        tensors += found
    classify.check()
    return plan, tensors


def _write_shard(src: Path, out: Path, name: str, actions: list[_Action],
                 meta: dict[str, str] | None) -> dict[str, torch.Tensor]:
    """Write one output shard (the kept tensors, rows sliced); returns its tensors."""
    tensors = {}
    with safe_open(str(src / name), framework="pt") as f:
        for a in actions:
            if a.out is None:
                continue
            t = f.get_tensor(a.key)
            if a.rows is not None:
                t = t.index_select(0, torch.tensor(a.rows, dtype=torch.long))
            tensors[a.out] = t.contiguous()
    if tensors:
        save_file(tensors, str(out / name), metadata=meta)
    return tensors


def prune_checkpoint(src_dir: str | Path, plan: Mapping[str, Iterable[int]],
                     out_dir: str | Path, *, force: bool = False,
                     trust_remote_code: bool = False) -> dict[str, Any]:
    """Write to ``out_dir`` the checkpoint of ``src_dir`` (safetensors, one file or
    sharded) without the experts of ``plan`` (block path -> expert ids to drop), reading
    one tensor at a time and holding at most one output shard in memory. Router rows and
    fused expert tensors keep the rows of the kept experts; per-expert tensors of dropped
    experts are left out and the others renumbered; the expert count in ``config.json`` is
    updated; the other files are copied; ``pruned_experts.json`` maps new ids to old ones.
    The plan is validated like :func:`~dlbhooks.analysis.pruning.drop_experts` does.
    ``force``: replace the contents of a non-empty ``out_dir``. Returns a summary: kept
    experts per block, tensors written, bytes and parameters (stored elements) before and
    after, files copied and skipped."""
    from transformers import AutoConfig

    src, out = Path(src_dir), Path(out_dir)
    drops = {block: [int(e) for e in ids] for block, ids in plan.items()}
    _check_out(src, out, force)
    config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    layout = moe_layout(config, trust_remote_code=trust_remote_code)
    kept = validate_plan({p: (b.num_experts, b.top_k) for p, b in layout.items()}, drops)
    cfg = json.loads((src / "config.json").read_text())
    n = len(next(iter(kept.values())))
    if not _set_counts(cfg, {b.num_experts for b in layout.values()}, n):
        raise ValueError(f"{src / 'config.json'}: no expert count ({', '.join(COUNT_ATTRS)}) "
                         "to update")
    shards, index = _shards(src)
    classify = _Classifier(layout, kept, _renamings(getattr(config, "model_type", None)))
    shard_plan, tensors = _plan_shards(src, shards, classify)

    _clear(out)
    weight_map: dict[str, str] = {}
    written = {"tensors": 0, "bytes": 0, "parameters": 0}
    for name, actions, meta in shard_plan:
        done = _write_shard(src, out, name, actions, meta)
        weight_map.update(dict.fromkeys(done, name))
        written["tensors"] += len(done)
        written["bytes"] += sum(t.nbytes for t in done.values())
        written["parameters"] += sum(t.numel() for t in done.values())
        del done
    if index is not None:
        sizes = dict(index.get("metadata") or {})
        sizes["total_size"] = written["bytes"]
        if "total_parameters" in sizes:
            sizes["total_parameters"] = written["parameters"]
        new_index = {**index, "metadata": sizes, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(new_index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    copied, skipped = _copy_others(src, out, shards)
    info = pruning_info(kept, drops)
    (out / "pruned_experts.json").write_text(json.dumps(info, indent=1) + "\n")
    return {"kept": kept, "tensors": written["tensors"],
            "tensors_dropped": len(tensors) - written["tensors"],
            "bytes_before": sum(t.nbytes for t in tensors), "bytes_after": written["bytes"],
            "parameters_before": sum(math.prod(t.shape) for t in tensors),
            "parameters_after": written["parameters"], "copied": copied, "skipped": skipped}
