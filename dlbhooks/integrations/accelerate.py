"""Weights offloaded by accelerate (device maps with "cpu" or "disk", ``init_empty_weights``).

accelerate keeps an offloaded module's parameters on the meta device outside its forward
and loads them (from CPU memory or disk) inside it. The reverse pass reads weights through
:func:`dlbhooks.weights.fetch_param`, which calls :func:`materialise` for a meta tensor: the
module's weights are brought to its execution device with accelerate's own
``align_module_device`` only while the rule that asked for them runs, then dropped, so the
whole model is never held in memory.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import OffloadError


def hf_hook(module: nn.Module):
    """accelerate's hook on ``module`` (``add_hook_to_module`` keeps it in the private
    attribute ``_hf_hook``, accelerate 1.x; pinned by tests/test_hf_internals.py), or
    ``None``. The one place dlbhooks reads it."""
    return module.__dict__.get("_hf_hook")


def _has_offloaded_params(module: nn.Module) -> bool:
    if hf_hook(module) is None:
        return False
    from accelerate.utils import has_offloaded_params

    return has_offloaded_params(module)


def materialise(module: nn.Module, name: str, ancestors: tuple[nn.Module, ...] = ()) -> Tensor:
    """The real value of ``module.<name>``, which is on the meta device.

    Loaded by the module's own offload hook or, failing that, by the nearest of
    ``ancestors`` (nearest first) whose hook loads its submodules' weights too
    (accelerate's ``preload_module_classes``). Raises
    :class:`~dlbhooks.errors.OffloadError` when no hook can load it (e.g. a model built
    under ``init_empty_weights`` whose weights were never loaded).
    """
    from accelerate.utils import align_module_device

    for owner in (module, *ancestors):
        if not _has_offloaded_params(owner):
            continue
        with align_module_device(owner):
            value = getattr(module, name)
            if value is not None and value.device.type != "meta":
                return value.detach()
    raise OffloadError(
        f"{type(module).__module__}.{type(module).__name__}.{name} is on the meta device and "
        "no accelerate offload hook loads it, so its values are unknown. Load the weights "
        "before explaining: accelerate.load_checkpoint_and_dispatch(model, checkpoint, "
        "device_map=...) or from_pretrained(..., device_map=..., offload_folder=...)."
    )


def execution_device(module: nn.Module):
    """The device accelerate runs ``module`` on, or ``None`` if no hook says."""
    return getattr(hf_hook(module), "execution_device", None)


def input_device(model: nn.Module):
    """Where to put a model's inputs: accelerate's execution device of the top module if
    it has one, else the device of the first parameter not on the meta device, else CPU."""
    import torch

    dev = execution_device(model)
    if dev is not None:
        return torch.device(dev) if not isinstance(dev, torch.device) else dev
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")
