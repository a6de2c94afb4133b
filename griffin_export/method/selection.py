"""Neuron selection: scores -> k sorted indices per layer. The selectors and the static weight
score here are the methods' (registry.METHODS names them); `select_all` runs a method's selector
over every layer."""

from __future__ import annotations

import torch

from ..errors import GriffinError
from ..model.arch import ff_blocks, magnitude_scores
from ..model.load import LoadedModel
from ..registry import Ref, method
from ..settings import check_density


def k_for(density: float, d_ff: int) -> int:
    k = round(check_density(density) * d_ff)
    if k < 1:
        raise GriffinError(f"density {density} keeps k=0 of {d_ff} FF neurons; use a larger density")
    return k


# -- selectors: (scores [D_ff], k, generator) -> k indices -------------------------------------


def topk(scores: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.topk(scores, k).indices


def sample(scores: torch.Tensor, k: int, gen: torch.Generator, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """k neurons drawn without replacement, probability ∝ score (none of `exclude`)."""
    # A tiny floor so zero-score neurons stay drawable when fewer than k are non-zero.
    w = scores.double().clamp_min(0) + 1e-12 * float(scores.abs().max().clamp_min(1e-30))
    if exclude is not None:
        w[exclude] = 0
    return torch.multinomial(w, k, replacement=False, generator=gen)


def topk_sample(scores: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    top = torch.topk(scores, k // 2).indices
    return torch.cat([top, sample(scores, k - top.numel(), gen, exclude=top)])


def uniform(scores: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(scores.numel(), generator=gen)[:k]


# -- static scores: (model) -> [L, D_ff] ---------------------------------------------------------


def weight_scores(lm: LoadedModel) -> torch.Tensor:
    """`magnitude`'s prompt-independent score: the product of each neuron's input-row norms
    (‖W_gate row‖·‖W_up row‖, ‖W_fc1 row‖ for OPT)."""
    return torch.stack([magnitude_scores(b, lm.spec, lm.d_ff) for b in ff_blocks(lm.model, lm.spec)])


def select_all(scores: torch.Tensor, k: int | list[int], method_name: str, seed: int) -> list[torch.Tensor]:
    """Per-layer selection for [num_layers, D_ff] scores, deterministic for a seed; k is one
    count for every layer or one per layer. Indices come back sorted, int64."""
    chosen = method(method_name).select
    select = chosen.resolve() if isinstance(chosen, Ref) else chosen  # an extension's entry may hold the function
    ks = [k] * len(scores) if isinstance(k, int) else list(k)
    if len(ks) != len(scores):
        raise GriffinError(f"{len(ks)} per-layer budgets for {len(scores)} layers")
    gen = torch.Generator().manual_seed(seed)
    return [select(s, kl, gen).sort().values.to(torch.int64) for s, kl in zip(scores, ks)]
