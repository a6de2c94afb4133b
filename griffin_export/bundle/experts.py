"""Experts in a model: checking a bundle against the base model, and installing its sliced FF
linears, for a `with` block or for good. Everything that runs a model with a bundle's weights
(both runtimes, ONNX export, checkpoint, eval, classes) goes through here, so the checks and
the "already installed" rule are written once."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from ..errors import GriffinError
from ..model.arch import ff_blocks, install_slice, per_layer, sliced
from ..model.load import LoadedModel, dtype_name
from .format import BundleInfo, check_compatible

_MARK = "_griffin_experts"  # set on a model whose FF linears a runtime replaced for good


def check_bundle(lm: LoadedModel, info: BundleInfo, source: str) -> None:
    """A bundle only runs on the exact base model it was exported from, loaded in its dtype."""
    check_compatible(info, architecture=lm.architecture, fingerprint=lm.fingerprint, identity=lm.identity,
                     num_layers=lm.num_layers, d_ff=lm.d_ff, hidden_size=lm.hidden_size, source=source)
    if info.dtype != dtype_name(lm.dtype):
        raise GriffinError(f"{source} holds {info.dtype} weights; the base model is loaded as {dtype_name(lm.dtype)}")


def check_fresh(lm: LoadedModel) -> None:
    # a second bundle on a model that holds a first one's experts would slice the slices
    if getattr(lm.model, _MARK, False):
        raise GriffinError("this model already has a bundle's experts installed; load a fresh base model")


def install(lm: LoadedModel, weights: dict[str, torch.Tensor]) -> None:
    """Replace the FF linears by the experts' for good (the runtimes, checkpoint); the model is
    marked, and check_fresh refuses it from then on."""
    check_fresh(lm)
    device = lm.device
    blocks = ff_blocks(lm.model, lm.spec)
    for block, t in zip(blocks, per_layer(blocks, weights)):
        install_slice(block, lm.spec, {k: v.to(device) for k, v in t.items()})
    setattr(lm.model, _MARK, True)


@contextmanager
def installed(lm: LoadedModel, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """The experts' FF linears in the model for the block's duration; the full ones come back after."""
    check_fresh(lm)
    blocks = ff_blocks(lm.model, lm.spec)
    with sliced(blocks, lm.spec, per_layer(blocks, {k: v.to(lm.device) for k, v in weights.items()})):
        yield
