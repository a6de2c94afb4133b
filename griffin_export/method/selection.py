"""Neuron selection: scores -> k sorted indices per layer."""

from __future__ import annotations

import torch

from ..choices import METHOD_SUMMARIES, METHODS, REFIT  # noqa: F401  (the registry; imported from here too)
from ..errors import GriffinError
from ..settings import check_density, check_method


def k_for(density: float, d_ff: int) -> int:
    k = round(check_density(density) * d_ff)
    if k < 1:
        raise GriffinError(f"density {density} keeps k=0 of {d_ff} FF neurons; use a larger density")
    return k


def _sample(scores: torch.Tensor, k: int, gen: torch.Generator, exclude: torch.Tensor | None = None) -> torch.Tensor:
    # A tiny floor so zero-score neurons stay drawable when fewer than k are non-zero.
    w = scores.double().clamp_min(0) + 1e-12 * float(scores.abs().max().clamp_min(1e-30))
    if exclude is not None:
        w[exclude] = 0
    return torch.multinomial(w, k, replacement=False, generator=gen)


def select(scores: torch.Tensor, k: int, method: str, gen: torch.Generator) -> torch.Tensor:
    """k sorted neuron indices from one layer's scores [D_ff].

    `magnitude` scores come from the weights, the others from the prompt; both arrive
    here as `scores`, so `magnitude` selects like `topk`.
    """
    d = scores.numel()
    method = REFIT.get(method, method)
    if method in ("topk", "magnitude"):
        idx = torch.topk(scores, k).indices
    elif method == "sample":
        idx = _sample(scores, k, gen)
    elif method == "topk_sample":
        top = torch.topk(scores, k // 2).indices
        idx = torch.cat([top, _sample(scores, k - top.numel(), gen, exclude=top)])
    elif method == "random":
        idx = torch.randperm(d, generator=gen)[:k]
    else:
        check_method(method)
    return idx.sort().values.to(torch.int64)


def select_all(scores: torch.Tensor, k: int | list[int], method: str, seed: int) -> list[torch.Tensor]:
    """Per-layer selection for [num_layers, D_ff] scores, deterministic for a seed; k is one
    count for every layer or one per layer."""
    check_method(method)
    ks = [k] * len(scores) if isinstance(k, int) else list(k)
    if len(ks) != len(scores):
        raise GriffinError(f"{len(ks)} per-layer budgets for {len(scores)} layers")
    gen = torch.Generator().manual_seed(seed)
    return [select(s, kl, method, gen) for s, kl in zip(scores, ks)]
