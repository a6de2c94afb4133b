"""Reading weights of a model that accelerate placed with a device map (models.Offload).

Offloaded parameters sit on the "meta" device between forwards; accelerate's hook on each
module holds where their values are (CPU RAM, or a folder on disk) and the device it runs on.
Everything that slices, scores or hashes weights reads them through `param_values` so it works on
either kind of model."""

from __future__ import annotations

import torch
from torch import nn


def execution_device(model: nn.Module) -> torch.device:
    for module in model.modules():
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return next(model.parameters()).device


def materialized(module: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """`module`'s tensor `name` (currently `t`) with its values: an accelerate-offloaded one is
    read from its hook's weights map (CPU RAM or the disk folder), on the execution device."""
    if t.device.type != "meta":
        return t
    hook = getattr(module, "_hf_hook", None)
    weights = getattr(hook, "weights_map", None)
    if weights is None or name not in weights:
        return t  # a meta tensor nothing holds values for (skipped by the fingerprint, as before)
    return weights[name].to(hook.execution_device or "cpu")


def param_values(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """A parameter's values, offloaded or not: what code that slices or scores weights reads."""
    return materialized(module, name, getattr(module, name))
